"""The ComfyUI API's parts without a server: the name tables, ComfyUI's schedule cuts, the inpainting
sampler's known region, graph validation, the LoRA patcher and the file folders."""

from __future__ import annotations

import pytest
import torch

from latentdiffusion.diffusion.schedules import DISCRETISATIONS
from latentdiffusion.errors import UserError
from latentdiffusion.samplers import SAMPLERS
from latentdiffusion.serving.comfy import files, graph, names
from latentdiffusion.serving.comfy.catalog import NODES
from latentdiffusion.serving.comfy.lora import WeightPatcher
from latentdiffusion.serving.comfy.sampling import Sampling, ksample, levels, sampling_options, schedule
from latentdiffusion.serving.comfy.schedulers import comfy_sigmas
from latentdiffusion.serving.comfy.values import Clip, Conditioning, Latent, Model


def test_name_tables_point_at_our_samplers_and_discretisations():
    assert {choice.name for choice in names.SAMPLERS.values()} <= set(SAMPLERS)
    assert set(names.SCHEDULERS.values()) - {None} <= set(DISCRETISATIONS)
    assert not set(names.SAMPLERS) & set(names.UNSUPPORTED_SAMPLERS)
    assert names.SAMPLERS["uni_pc"].options == {"variant": "bh1"}
    assert names.discretisation("normal", "discrete") == "linspace"
    assert names.discretisation("normal", "flow") is None  # a flow model keeps its own levels
    assert names.discretisation("karras", "flow") == "karras"
    assert "not implemented" in names.refusal("sampler_name", "dpm_fast")
    with pytest.raises(UserError, match="discrete-timestep"):  # table-only schedulers on a flow model
        names.discretisation("beta", "flow")
    assert "not in" in names.refusal("scheduler", "nonsense")


def test_schedule_cuts_as_comfyui(tiny_pipe):
    components = tiny_pipe.components
    setting = Sampling(1, 4, 7.0, "euler", "normal", denoise=0.5)
    options = sampling_options(Model(components), setting)
    longer = levels(
        components, sampling_options(Model(components), Sampling(1, 8, 7.0, "euler", "normal")), "normal"
    )
    run = schedule(components, options, setting)
    assert torch.equal(run.sigmas, longer[-5:]) and not run.top and not run.cut

    whole = levels(components, options, "normal")
    assert torch.equal(whole, comfy_sigmas("normal", components.process.schedule.sigmas, 4))
    first = schedule(components, options, Sampling(1, 4, 7.0, "euler", "normal", start=0, end=2))
    assert torch.equal(first.sigmas, whole[:3]) and first.top and first.cut
    forced = schedule(
        components, options, Sampling(1, 4, 7.0, "euler", "normal", start=1, end=3, force_full_denoise=True)
    )
    assert torch.equal(forced.sigmas[:-1], whole[1:3]) and forced.sigmas[-1] == 0 and not forced.cut
    assert len(schedule(components, options, Sampling(1, 4, 7.0, "euler", "normal", start=4)).sigmas) == 1
    assert len(schedule(components, options, Sampling(1, 4, 7.0, "euler", "normal", denoise=0.0)).sigmas) == 1
    with pytest.raises(UserError, match="limit"):
        schedule(components, options, Sampling(1, 150, 7.0, "euler", "normal", denoise=0.001))


def test_noise_mask_keeps_the_known_latent_exactly(tiny_pipe):
    components = tiny_pipe.components
    clip = Clip(components)
    latents = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 32:] = 1  # repaint the right half
    latent = Latent(latents, 64, 64, 2, mask)
    seen = []
    result = ksample(
        Model(components),
        Conditioning("a red cube", clip),
        Conditioning("", clip),
        latent,
        Sampling(5, 3, 6.0, "dpmpp_2m", "karras"),
        use_clip=lambda c: None,
        use_model=lambda m: None,
        controlled=lambda components, *rest: components,
        callback=lambda step, steps, x, x0: seen.append((step, steps)),
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert torch.equal(result[..., :16], latents[..., :16])
    assert (result[..., 16:] != latents[..., 16:]).float().mean() > 0.99


def default_graph() -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a", "clip": ["4", 1]},
            "_meta": {"title": "x"},
        },
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": 1,
                "steps": 2,
                "cfg": 7,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["6", 0],
                "latent_image": ["5", 0],
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x", "images": ["8", 0]}},
    }


class FakeServer:
    """The choices a server offers, for validation without one."""

    class state:  # stands in for ServerState
        class limits:
            max_side, max_steps, max_images, max_prompt_chars = 256, 150, 4, 100

    def checkpoints(self):
        return ["tiny"]

    def loras(self):
        return ["style.safetensors"]

    def controlnets(self):
        return []

    def input_images(self):
        return ["a.png"]

    def explain_choice(self, name, value):
        return None


def test_validation_converts_orders_and_finds_cycles():
    prompt = default_graph()
    prompt["3"]["inputs"]["steps"] = "2"
    checked = graph.validate(prompt, NODES, FakeServer())
    assert checked.error is None and checked.outputs == ["9"]
    assert prompt["3"]["inputs"]["steps"] == 2 and prompt["3"]["inputs"]["cfg"] == 7.0
    order = graph.evaluation_order(prompt, ["9"], NODES)
    assert order.index("4") < order.index("6") < order.index("3") < order.index("8") < order.index("9")

    looped = default_graph()
    looped["5"] = {"class_type": "LatentUpscale", "inputs": {
        "samples": ["3", 0], "upscale_method": "bilinear", "width": 64, "height": 64, "crop": "disabled"
    }}  # fmt: skip
    checked = graph.validate(looped, NODES, FakeServer())
    assert checked.error["type"] == "prompt_outputs_failed_validation"
    found = [e["type"] for entry in checked.node_errors.values() for e in entry["errors"]]
    assert found == ["dependency_cycle"]

    too_big = {str(i): {"class_type": "PreviewImage", "inputs": {}} for i in range(graph.MAX_NODES + 1)}
    checked = graph.validate(too_big, NODES, FakeServer())
    assert checked.error["type"] == "invalid_prompt" and "at most" in checked.error["message"]


def test_outputs_that_fail_are_left_out_when_others_pass():
    prompt = default_graph()
    prompt["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}
    prompt["11"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0]}}  # no vae
    checked = graph.validate(prompt, NODES, FakeServer())
    assert checked.error is None and checked.outputs == ["9"]
    assert checked.node_errors["11"]["dependent_outputs"] == ["10"]
    assert checked.node_errors["11"]["errors"][0]["type"] == "required_input_missing"


def test_weight_patcher_merges_per_network_and_restores_exactly(tiny_lora):
    import latentdiffusion as ld

    components = ld.load("preset:tiny").components
    path = tiny_lora
    before = {
        role: {k: v.clone() for k, v in m.state_dict().items()} for role, m in components.modules.items()
    }

    def changed(role: str) -> bool:
        state = components.modules[role].state_dict()
        return any(not torch.equal(state[k], before[role][k]) for k in state)

    patcher = WeightPatcher(components)
    patcher.use([(path, 1.0)], [])
    assert changed("unet") and not changed("text_encoder")
    patcher.use([], [(path, 0.5)])
    assert not changed("unet") and changed("text_encoder")
    patcher.use([(path, 1.0)], [(path, 1.0)])
    patcher.restore()
    assert not changed("unet") and not changed("text_encoder") and not changed("autoencoder")


def test_file_store_names_budget_and_path_tricks(monkeypatch):
    store = files.FileStore()
    assert store.upload("input", "", "a.png", b"one", overwrite=False) == "a.png"
    assert store.upload("input", "", "a.png", b"one", overwrite=False) == "a.png"
    assert store.upload("input", "", "a.png", b"two", overwrite=False) == "a (1).png"
    assert store.upload("input", "sub", "a.png", b"two", overwrite=True) == "a.png"
    assert store.names("input") == ["a (1).png", "a.png", "sub/a.png"]
    assert files.parse_reference("sub/a.png [output]") == ("output", "sub", "a.png")
    for bad in ("../x.png", "a/b.png", "..", "x\\y.png"):
        with pytest.raises(UserError):
            store.upload("input", "", bad, b"x", overwrite=False)
    with pytest.raises(UserError):
        store.upload("input", "../up", "x.png", b"x", overwrite=False)
    monkeypatch.setitem(files.BUDGET, "temp", 10)
    store.put(("temp", "", "1"), b"123456")
    store.put(("temp", "", "2"), b"123456")  # over the budget: the oldest goes
    assert store.get(("temp", "", "1")) is None and store.get(("temp", "", "2")) == b"123456"


def test_cli_lora_dir_must_be_a_folder(tmp_path, capsys):
    from latentdiffusion.cli.main import main

    assert main(["serve", "--model", "preset:tiny", "--lora-dir", str(tmp_path / "missing")]) == 2
    assert "--lora-dir" in capsys.readouterr().err


def test_every_declaration_fits_its_function_and_describes_itself():
    import inspect
    import json

    for name, node in NODES.items():
        parameters = inspect.signature(node.run).parameters
        assert next(iter(parameters)) == "run", name
        assert set(node.inputs()) <= set(parameters), name
        needed = {p for p, v in parameters.items() if v.default is inspect.Parameter.empty} - {"run"}
        assert needed <= set(node.required), name
        info = json.loads(json.dumps(node.info(FakeServer())))
        assert info["name"] == name and info["input_order"]["required"] == list(node.required)
        assert info["output_node"] == (not node.outputs)
