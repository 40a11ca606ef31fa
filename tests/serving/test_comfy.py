"""The ComfyUI-compatible API against a real server over the tiny model, driven as ComfyUI clients drive
it: workflows in API format posted with httpx, progress read from /ws with a websocket client
(websocket-client), images fetched with /view, and the package-index client comfy-api-simplified.

Exact answers: the default workflow's image is the library's text-to-image image for the same noise
and settings; a LoRA workflow's is the image of the model with the LoRA merged, and the plain model
gives its old image bit for bit afterwards; KSamplerAdvanced in two halves equals KSampler in one.
"""

from __future__ import annotations

import copy
import io
import json
import math
import uuid

import numpy as np
import pytest
import torch
from PIL import Image

websocket = pytest.importorskip("websocket", reason="the ComfyUI tests need websocket-client")
httpx = pytest.importorskip("httpx")

from latentdiffusion.serving.settings import Limits, ServerSettings  # noqa: E402

from .conftest import write_tiny_controlnet  # noqa: E402

SIZE = 64  # the tiny model's sample size
LIMITS = Limits(max_side=256, max_steps=150, max_images=4, queue_size=8)


def gradient(size: int = SIZE) -> Image.Image:
    image = Image.new("RGB", (size, size))
    image.putdata([(255 * x // size, 255 * y // size, 128) for y in range(size) for x in range(size)])
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# The workflow ComfyUI's front end sends for its default graph (API format), at the tiny model's size.
DEFAULT_WORKFLOW = {
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 156680208700286,
            "steps": 20,
            "cfg": 8,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["7", 0],
            "latent_image": ["5", 0],
        },
        "_meta": {"title": "KSampler"},
    },
    "4": {
        "class_type": "CheckpointLoaderSimple",
        "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"},
        "_meta": {"title": "Load Checkpoint"},
    },
    "5": {
        "class_type": "EmptyLatentImage",
        "inputs": {"width": 512, "height": 512, "batch_size": 1},
        "_meta": {"title": "Empty Latent Image"},
    },
    "6": {
        "class_type": "CLIPTextEncode",
        "inputs": {
            "text": "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
            "clip": ["4", 1],
        },
        "_meta": {"title": "CLIP Text Encode (Prompt)"},
    },
    "7": {
        "class_type": "CLIPTextEncode",
        "inputs": {"text": "text, watermark", "clip": ["4", 1]},
        "_meta": {"title": "CLIP Text Encode (Negative)"},
    },
    "8": {
        "class_type": "VAEDecode",
        "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
        "_meta": {"title": "VAE Decode"},
    },
    "9": {
        "class_type": "SaveImage",
        "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
        "_meta": {"title": "Save Image"},
    },
}


def workflow(steps: int = 4, **changes: dict) -> dict:
    """The default workflow at the tiny model's size and name, with ``changes`` (node id -> inputs)."""
    graph = copy.deepcopy(DEFAULT_WORKFLOW)
    graph["4"]["inputs"]["ckpt_name"] = "tiny"
    graph["5"]["inputs"].update(width=SIZE, height=SIZE)
    graph["3"]["inputs"]["steps"] = steps
    # "simple" takes every (T / steps)-th training level from the top: the library's "trailing" spacing
    # when steps divide T, so the library can reproduce the run ("normal" interpolates log sigma, which
    # only the ComfyUI API does; tests/serving/test_comfy_schedules.py checks its levels).
    graph["3"]["inputs"]["scheduler"] = "simple"
    for node, inputs in changes.items():
        graph[node]["inputs"].update(inputs)
    return graph


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A LoRA for the tiny model (U-Net attention and text encoder, random B so that it changes both)."""
    from latentdiffusion.checkpoints.lora_keys import save_lora
    from latentdiffusion.components import build_components
    from latentdiffusion.config import TINY
    from latentdiffusion.models.lora import inject_lora, lora_modules, lora_state_dict

    components = build_components(TINY, seed=0)
    nets = {"unet": components.unet, "text_encoder": components.text_encoder}
    inject_lora(nets, ("attention", "text"), rank=2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for net in nets.values():
            for module in lora_modules(net).values():
                module.lora_up.weight.copy_(
                    0.5 * torch.randn(module.lora_up.weight.shape, generator=generator)
                )
    folder = tmp_path_factory.mktemp("loras")
    save_lora(folder / "style.safetensors", {n: lora_state_dict(m) for n, m in nets.items()}, TINY)
    return folder / "style.safetensors"


@pytest.fixture
def comfy_server(tiny_pipe, lora_file, start_server):
    with start_server(tiny_pipe, ServerSettings(limits=LIMITS, lora_dir=lora_file.parent)) as server:
        yield server


class Client:
    """A ComfyUI API client as front ends are: a websocket with a client id, prompts posted with it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client_id = uuid.uuid4().hex
        self.ws = websocket.create_connection(
            url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}", timeout=60
        )
        self.first = json.loads(self.ws.recv())

    def queue(self, graph: dict) -> httpx.Response:
        return httpx.post(
            self.url + "/prompt", json={"prompt": graph, "client_id": self.client_id}, timeout=30
        )

    def run(self, graph: dict) -> tuple[str, list[dict]]:
        """Queue ``graph`` and read its messages until ComfyUI's end marker (executing, node null)."""
        answer = self.queue(graph)
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
        messages = []
        while True:
            message = json.loads(self.ws.recv())
            messages.append(message)
            data = message["data"]
            if message["type"] == "executing" and data["node"] is None and data["prompt_id"] == prompt_id:
                return prompt_id, messages

    def images(self, prompt_id: str, node: str = "9") -> list[Image.Image]:
        entry = httpx.get(f"{self.url}/history/{prompt_id}").json()[prompt_id]
        assert entry["status"]["status_str"] == "success", entry["status"]
        found = []
        for ref in entry["outputs"][node]["images"]:
            answer = httpx.get(self.url + "/view", params=ref)
            assert answer.status_code == 200 and answer.headers["content-type"] == "image/png"
            found.append(Image.open(io.BytesIO(answer.content)))
        return found

    def close(self) -> None:
        self.ws.close()


@pytest.fixture
def client(comfy_server):
    client = Client(comfy_server.url)
    yield client
    client.close()


def kinds(messages: list[dict]) -> list[str]:
    return [m["type"] for m in messages]


def comfy_noise_scale(pipe) -> float:
    """ComfyUI starts a run at the top level with noise * sqrt(1 + sigma_max^2); the library's Euler
    with "trailing" levels with noise * sigma_max."""
    sigma_max = float(pipe.components.process.schedule.sigmas.float()[-1])
    return math.sqrt(1 + sigma_max**2) / sigma_max


def same_image(ours, theirs) -> bool:
    """Equal but for float rounding: ComfyUI scales its starting noise by sqrt(1 + sigma_max^2), the
    library the rescaled noise by sigma_max, which moves a few pixels by one level."""
    a = np.asarray(ours.convert("RGB"), dtype=np.int16)
    b = np.asarray(theirs.convert("RGB"), dtype=np.int16)
    return a.shape == b.shape and np.abs(a - b).max() <= 1 and (a != b).mean() < 0.05


def library_image(
    pipe, positive: str, negative: str, seed: int, steps: int, cfg: float, **options
) -> Image.Image:
    """What the library makes from ComfyUI's noise (one CPU draw from torch.manual_seed(seed))."""
    from latentdiffusion.pipelines.text_to_image import latent_shape

    shape = latent_shape(pipe.components, 1, SIZE, SIZE)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * comfy_noise_scale(pipe)
    return pipe.generate(
        positive, negative, SIZE, SIZE, steps=steps, guidance_scale=cfg, latents=noise, **options
    )[0]


def test_default_workflow_with_progress_on_the_websocket(client, tiny_pipe):
    info = httpx.get(client.url + "/object_info/CheckpointLoaderSimple").json()
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["tiny"]
    graph = workflow(steps=20)
    prompt_id, messages = client.run(graph)
    assert client.first["type"] == "status" and client.first["data"]["sid"] == client.client_id
    ours = [m for m in messages if m["data"].get("prompt_id") == prompt_id]
    order = kinds(ours)
    assert order[:2] == ["execution_start", "execution_cached"]
    assert order[-2:] == ["execution_success", "executing"]
    progress = [m["data"] for m in ours if m["type"] == "progress"]
    assert [p["value"] for p in progress] == list(range(1, 21))
    assert {p["max"] for p in progress} == {20} and {p["node"] for p in progress} == {"3"}
    executing = [m["data"]["node"] for m in ours if m["type"] == "executing"]
    assert set(executing[:-1]) == set(graph) and executing.index("3") < executing.index(
        "8"
    ) < executing.index("9")
    (executed,) = [m["data"] for m in ours if m["type"] == "executed"]
    assert executed["node"] == "9"
    assert executed["output"]["images"][0]["filename"].startswith("ComfyUI_")

    (image,) = client.images(prompt_id)
    assert image.size == (SIZE, SIZE)
    assert json.loads(image.text["prompt"])["3"]["inputs"]["seed"] == 156680208700286
    inputs = graph["3"]["inputs"]
    expected = library_image(
        tiny_pipe,
        graph["6"]["inputs"]["text"],
        graph["7"]["inputs"]["text"],
        inputs["seed"],
        20,
        8.0,
        sampler="euler",
        sigmas="trailing",
    )
    assert same_image(image, expected)


def test_default_workflow_as_sent_is_refused_naming_nodes_and_limits(comfy_server):
    answer = httpx.post(comfy_server.url + "/prompt", json={"prompt": DEFAULT_WORKFLOW})
    assert answer.status_code == 400
    body = answer.json()
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    errors = body["node_errors"]
    assert errors["4"]["class_type"] == "CheckpointLoaderSimple"
    assert errors["4"]["errors"][0]["type"] == "value_not_in_list"
    assert "tiny" in errors["4"]["errors"][0]["details"]
    assert {e["type"] for e in errors["5"]["errors"]} == {"value_bigger_than_max"}  # 512 > the limit 256
    assert errors["5"]["dependent_outputs"] == ["9"]


def test_unknown_node_type_answers_comfyui_error_format(comfy_server):
    graph = workflow()
    graph["3"]["class_type"] = "KSamplerTurbo"
    answer = httpx.post(comfy_server.url + "/prompt", json={"prompt": graph})
    assert answer.status_code == 400
    assert answer.json() == {
        "error": {
            "type": "invalid_prompt",
            "message": "Cannot execute because node KSamplerTurbo does not exist.",
            "details": "Node ID '#3'",
            "extra_info": {},
        },
        "node_errors": {},
    }


@pytest.mark.parametrize(
    ("node", "inputs", "kind", "says"),
    [
        ("3", {"sampler_name": "dpm_fast"}, "value_not_in_list", "not implemented by this server"),
        ("3", {"scheduler": "ays"}, "value_not_in_list", "not in"),
        ("3", {"steps": "many"}, "invalid_input_type", "steps"),
        ("3", {"steps": 151}, "value_bigger_than_max", "steps"),
        ("8", {"samples": ["4", 0]}, "return_type_mismatch", "MODEL"),
        ("8", {"samples": ["99", 0]}, "bad_linked_input", "99"),
        ("6", {"text": "x" * 5000}, "custom_validation_failed", "limit"),
    ],
)
def test_bad_inputs_are_named(comfy_server, node, inputs, kind, says):
    graph = workflow(**{node: inputs})
    answer = httpx.post(comfy_server.url + "/prompt", json={"prompt": graph})
    assert answer.status_code == 400
    (error,) = answer.json()["node_errors"][node]["errors"]
    assert error["type"] == kind
    assert says in error["details"] + error["message"]


def test_missing_input_and_no_outputs(comfy_server):
    graph = workflow()
    del graph["3"]["inputs"]["cfg"]
    (error,) = httpx.post(comfy_server.url + "/prompt", json={"prompt": graph}).json()["node_errors"]["3"][
        "errors"
    ]
    assert error["type"] == "required_input_missing" and error["details"] == "cfg"
    graph = workflow()
    del graph["9"]
    answer = httpx.post(comfy_server.url + "/prompt", json={"prompt": graph})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "prompt_no_outputs"
    answer = httpx.post(comfy_server.url + "/prompt", json={"nothing": 1})
    assert answer.status_code == 400 and answer.json()["error"]["type"] == "no_prompt"


def upload(url: str, image: Image.Image, name: str = "picture.png") -> dict:
    answer = httpx.post(url + "/upload/image", files={"image": (name, png_bytes(image), "image/png")})
    assert answer.status_code == 200, answer.text
    return answer.json()


def img2img_graph(name: str, denoise: float, steps: int = 6) -> dict:
    graph = workflow(steps=steps, **{"3": {"denoise": denoise, "latent_image": ["11", 0]}})
    graph["10"] = {"class_type": "LoadImage", "inputs": {"image": name}}
    graph["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    del graph["5"]
    return graph


def test_img2img_runs_steps_of_a_longer_schedule(client):
    stored = upload(client.url, gradient())
    assert stored == {"name": "picture.png", "subfolder": "", "type": "input"}
    assert upload(client.url, gradient())["name"] == "picture.png"  # the same content keeps its name
    listed = httpx.get(client.url + "/object_info/LoadImage").json()["LoadImage"]["input"]["required"][
        "image"
    ]
    assert "picture.png" in listed[0] and listed[1] == {"image_upload": True}

    prompt_id, messages = client.run(img2img_graph("picture.png", denoise=0.5))
    progress = [
        m["data"] for m in messages if m["type"] == "progress" and m["data"]["prompt_id"] == prompt_id
    ]
    assert [p["value"] for p in progress] == list(range(1, 7)) and progress[0]["max"] == 6
    (edited,) = client.images(prompt_id)

    prompt_id, _ = client.run(img2img_graph("picture.png", denoise=0.0))
    (round_trip,) = client.images(prompt_id)  # denoise 0: no step, the autoencoder's round trip
    prompt_id, _ = client.run(workflow(steps=6))
    (generated,) = client.images(prompt_id)
    assert edited.size == round_trip.size == (SIZE, SIZE)
    assert edited.tobytes() not in (round_trip.tobytes(), generated.tobytes())

    graph = img2img_graph("missing.png", denoise=0.5)
    (error,) = client.queue(graph).json()["node_errors"]["10"]["errors"]
    assert error["type"] == "custom_validation_failed" and "missing.png" in error["details"]


def test_inpainting_with_a_noise_mask(client):
    picture = gradient().convert("RGBA")
    alpha = Image.new("L", picture.size, 255)
    alpha.paste(0, (SIZE // 2, 0, SIZE, SIZE))  # transparent right half: LoadImage's mask is 1 there
    picture.putalpha(alpha)
    upload(client.url, picture, "masked.png")
    graph = img2img_graph("masked.png", denoise=1.0)
    graph["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}}
    graph["3"]["inputs"]["latent_image"] = ["12", 0]
    prompt_id, messages = client.run(graph)
    assert "execution_success" in kinds(messages)
    (inpainted,) = client.images(prompt_id)

    prompt_id, _ = client.run(img2img_graph("masked.png", denoise=0.0))
    (round_trip,) = client.images(prompt_id)
    prompt_id, _ = client.run(img2img_graph("masked.png", denoise=1.0))
    (unmasked,) = client.images(prompt_id)
    assert inpainted.tobytes() not in (round_trip.tobytes(), unmasked.tobytes())

    # an opaque image's mask is all 0 (nothing to repaint): the sampler keeps the whole latent
    upload(client.url, gradient(), "opaque.png")
    graph = img2img_graph("opaque.png", denoise=1.0)
    graph["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["10", 1]}}
    graph["3"]["inputs"]["latent_image"] = ["12", 0]
    prompt_id, _ = client.run(graph)
    (kept,) = client.images(prompt_id)
    prompt_id, _ = client.run(img2img_graph("opaque.png", denoise=0.0))
    (opaque_round_trip,) = client.images(prompt_id)
    assert kept.tobytes() == opaque_round_trip.tobytes()

    # ComfyUI's inpainting-model path: grey under the mask, the grown mask as noise mask
    graph = img2img_graph("masked.png", denoise=1.0)
    graph["11"] = {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["10", 0], "vae": ["4", 2], "mask": ["10", 1], "grow_mask_by": 6},
    }
    prompt_id, messages = client.run(graph)
    assert "execution_success" in kinds(messages)


def lora_graph(strength_model: float, strength_clip: float) -> dict:
    graph = workflow(
        steps=5, **{"3": {"model": ["10", 0]}, "6": {"clip": ["10", 1]}, "7": {"clip": ["10", 1]}}
    )
    graph["10"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["4", 0],
            "clip": ["4", 1],
            "lora_name": "style.safetensors",
            "strength_model": strength_model,
            "strength_clip": strength_clip,
        },
    }
    return graph


def test_lora_workflow_equals_the_merged_model_and_leaves_the_model_as_it_was(client, lora_file):
    import latentdiffusion as ld

    listed = httpx.get(client.url + "/object_info/LoraLoader").json()["LoraLoader"]["input"]["required"]
    assert listed["lora_name"][0] == ["style.safetensors"]
    prompt_id, _ = client.run(workflow(steps=5))
    (plain,) = client.images(prompt_id)
    prompt_id, messages = client.run(lora_graph(0.8, 0.8))
    assert "execution_success" in kinds(messages)
    (styled,) = client.images(prompt_id)
    prompt_id, _ = client.run(workflow(steps=5))
    (again,) = client.images(prompt_id)
    assert again.tobytes() == plain.tobytes()  # the weights were restored bit for bit
    assert styled.tobytes() != plain.tobytes()

    merged = ld.load("preset:tiny")
    merged.load_lora(lora_file, 0.8)
    graph = workflow(steps=5)
    expected = library_image(
        merged,
        graph["6"]["inputs"]["text"],
        graph["7"]["inputs"]["text"],
        graph["3"]["inputs"]["seed"],
        5,
        8.0,
        sampler="euler",
        sigmas="trailing",
    )
    assert same_image(styled, expected)

    prompt_id, _ = client.run(lora_graph(0.0, 0.8))  # text encoders only
    (clip_only,) = client.images(prompt_id)
    assert clip_only.tobytes() not in (plain.tobytes(), styled.tobytes())


def eps_graph(factor) -> dict:
    graph = workflow(steps=5, **{"3": {"model": ["10", 0]}})
    graph["10"] = {"class_type": "Epsilon Scaling", "inputs": {"model": ["4", 0], "scaling_factor": factor}}
    return graph


def test_the_epsilon_scaling_node_equals_the_library_option(client, comfy_server, tiny_pipe):
    graph = eps_graph(0.9)
    prompt_id, messages = client.run(graph)
    assert "execution_success" in kinds(messages)
    (scaled,) = client.images(prompt_id)
    texts, seed = (graph["6"]["inputs"]["text"], graph["7"]["inputs"]["text"]), graph["3"]["inputs"]["seed"]
    run = {"sampler": "euler", "sigmas": "trailing"}
    assert same_image(scaled, library_image(tiny_pipe, *texts, seed, 5, 8.0, eps_scaling=0.9, **run))
    assert not same_image(scaled, library_image(tiny_pipe, *texts, seed, 5, 8.0, **run))
    answer = httpx.post(comfy_server.url + "/prompt", json={"prompt": eps_graph(2.0)})
    assert answer.status_code == 400
    (error,) = answer.json()["node_errors"]["10"]["errors"]
    assert error["type"] == "value_bigger_than_max"


def test_ksampler_advanced_in_two_halves_equals_one_ksampler(client):
    prompt_id, _ = client.run(workflow(steps=8))
    (whole,) = client.images(prompt_id)
    graph = workflow(steps=8)
    common = {
        key: graph["3"]["inputs"][key]
        for key in ("cfg", "sampler_name", "scheduler", "model", "positive", "negative", "steps")
    }
    graph["3"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **common,
            "add_noise": "enable",
            "noise_seed": 156680208700286,
            "latent_image": ["5", 0],
            "start_at_step": 0,
            "end_at_step": 3,
            "return_with_leftover_noise": "enable",
        },
    }
    graph["13"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            **common,
            "add_noise": "disable",
            "noise_seed": 0,
            "latent_image": ["3", 0],
            "start_at_step": 3,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
        },
    }
    graph["8"]["inputs"]["samples"] = ["13", 0]
    prompt_id, messages = client.run(graph)
    progress = [m["data"] for m in messages if m["type"] == "progress"]
    assert [(p["node"], p["value"], p["max"]) for p in progress] == [("3", i, 3) for i in (1, 2, 3)] + [
        ("13", i, 5) for i in range(1, 6)
    ]
    (halves,) = client.images(prompt_id)
    assert halves.tobytes() == whole.tobytes()


def test_hires_fix_latent_upscale_batch_and_preview(client):
    graph = workflow(steps=3, **{"5": {"batch_size": 2}})
    graph["10"] = {
        "class_type": "LatentUpscale",
        "inputs": {
            "samples": ["3", 0],
            "upscale_method": "bilinear",
            "width": 2 * SIZE,
            "height": 2 * SIZE,
            "crop": "disabled",
        },
    }
    graph["11"] = {
        "class_type": "KSampler",
        "inputs": {**graph["3"]["inputs"], "latent_image": ["10", 0], "denoise": 0.5},
    }
    graph["8"]["inputs"]["samples"] = ["11", 0]
    graph["12"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    prompt_id, _ = client.run(graph)
    images = client.images(prompt_id)
    assert [image.size for image in images] == [(2 * SIZE, 2 * SIZE)] * 2
    assert images[0].tobytes() != images[1].tobytes()  # one noise draw for the batch: two images
    entry = httpx.get(f"{client.url}/history/{prompt_id}").json()[prompt_id]
    previews = entry["outputs"]["12"]["images"]
    assert [p["type"] for p in previews] == ["temp", "temp"]
    assert httpx.get(client.url + "/view", params=previews[0]).status_code == 200


def test_queue_history_interrupt_and_the_api_prefix(client):
    graph = workflow(steps=150)
    prompt_id = client.queue(graph).json()["prompt_id"]
    waiting = client.queue(workflow(steps=150)).json()["prompt_id"]
    while True:  # the first prompt is sampling
        message = json.loads(client.ws.recv())
        if message["type"] == "progress":
            break
    queue = httpx.get(client.url + "/api/queue").json()
    assert [item[1] for item in queue["queue_running"]] == [prompt_id]
    assert [item[1] for item in queue["queue_pending"]] == [waiting]
    assert queue["queue_running"][0][2]["3"]["inputs"]["steps"] == 150
    assert httpx.post(client.url + "/queue", json={"delete": [waiting]}).status_code == 200
    assert httpx.post(client.url + "/interrupt").status_code == 200
    while True:
        message = json.loads(client.ws.recv())
        if message["type"] == "executing" and message["data"]["node"] is None:
            break
        last = message
    assert last["type"] == "execution_interrupted" and last["data"]["node_id"] == "3"
    entry = httpx.get(f"{client.url}/history/{prompt_id}").json()[prompt_id]
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"
    assert waiting not in httpx.get(client.url + "/history").json()
    assert httpx.get(client.url + "/queue").json() == {"queue_running": [], "queue_pending": []}
    assert httpx.get(client.url + "/prompt").json() == {"exec_info": {"queue_remaining": 0}}

    assert httpx.post(client.url + "/history", json={"delete": [prompt_id]}).status_code == 200
    assert httpx.get(f"{client.url}/history/{prompt_id}").json() == {}
    stats = httpx.get(client.url + "/api/system_stats").json()
    assert stats["devices"][0]["type"] == "cpu" and "python_version" in stats["system"]
    assert (
        httpx.get(client.url + "/view", params={"filename": "../secret", "type": "output"}).status_code == 400
    )
    assert httpx.get(client.url + "/view", params={"filename": "none.png"}).status_code == 404


def test_comfy_api_simplified_client(comfy_server, tmp_path):
    simplified = pytest.importorskip("comfy_api_simplified")
    api = simplified.ComfyApiWrapper(comfy_server.url)
    path = tmp_path / "input.png"
    gradient().save(path)
    assert api.upload_image(path)["name"] == "input.png"
    graph = simplified.ComfyWorkflowWrapper(workflow(steps=3))
    graph.set_node_param("KSampler", "seed", 7)
    images = api.queue_and_wait_images(graph, "Save Image")
    (data,) = images.values()
    assert Image.open(io.BytesIO(data)).size == (SIZE, SIZE)
    assert "KSampler" in api.get_object_info()


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    """tinycn/: a diffusers ControlNet folder for the tiny model with random weights."""
    folder = tmp_path_factory.mktemp("controlnets")
    write_tiny_controlnet(folder)
    return folder


def test_controlnet_nodes_equal_the_library_with_a_control_unit(tiny_pipe, controlnet_dir, start_server):
    import latentdiffusion as ld
    from latentdiffusion.checkpoints.controlnet import load_controlnet

    settings = ServerSettings(limits=LIMITS, controlnet_dir=controlnet_dir)
    with start_server(tiny_pipe, settings) as server:
        client = Client(server.url)
        listed = httpx.get(server.url + "/object_info/ControlNetLoader").json()
        assert listed["ControlNetLoader"]["input"]["required"]["control_net_name"][0] == ["tinycn"]
        hint = gradient().transpose(Image.Transpose.ROTATE_90)
        upload(server.url, hint, "hint.png")
        graph = workflow(steps=4, **{"3": {"positive": ["12", 0], "negative": ["12", 1]}})
        graph["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "tinycn"}}
        graph["11"] = {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}
        graph["12"] = {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["6", 0],
                "negative": ["7", 0],
                "control_net": ["10", 0],
                "image": ["11", 0],
                "strength": 0.8,
                "start_percent": 0.0,
                "end_percent": 0.5,
            },
        }
        prompt_id, messages = client.run(graph)
        assert "execution_success" in kinds(messages), messages[-3:]
        (controlled,) = client.images(prompt_id)
        graph["12"]["inputs"]["strength"] = 0.0
        prompt_id, _ = client.run(graph)
        (plain,) = client.images(prompt_id)
        client.close()
    assert controlled.tobytes() != plain.tobytes()
    unit = ld.Control(load_controlnet(controlnet_dir / "tinycn"), hint, strength=0.8, start=0.0, end=0.5)
    inputs = graph["3"]["inputs"]
    text = (graph["6"]["inputs"]["text"], graph["7"]["inputs"]["text"])
    options = {"sampler": "euler", "sigmas": "trailing"}
    expected = library_image(tiny_pipe, *text, inputs["seed"], 4, 8.0, control=[unit], **options)
    assert same_image(controlled, expected)
    assert same_image(plain, library_image(tiny_pipe, *text, inputs["seed"], 4, 8.0, **options))


def test_a_failing_node_ends_the_prompt_with_execution_error(client):
    upload(client.url, gradient(300), "large.png")  # over the test server's 256-pixel side
    prompt_id, messages = client.run(img2img_graph("large.png", denoise=0.5))
    (failure,) = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert (
        failure["prompt_id"] == prompt_id
        and failure["node_id"] == "11"
        and failure["node_type"] == "VAEEncode"
    )
    assert "256" in failure["exception_message"] and failure["traceback"] == []
    assert "10" in failure["executed"]
    entry = httpx.get(f"{client.url}/history/{prompt_id}").json()[prompt_id]
    assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
    prompt_id, messages = client.run(workflow())  # the server carries on
    assert "execution_success" in kinds(messages)


def test_api_key_guards_the_comfyui_routes_and_websocket(tiny_pipe, start_server):
    settings = ServerSettings(limits=LIMITS, api_key="s3cret")
    key = {"Authorization": "Bearer s3cret"}
    with start_server(tiny_pipe, settings) as server:
        ws_url = server.url.replace("http://", "ws://") + "/ws?clientId=x"
        for route in ("/prompt", "/api/prompt", "/object_info", "/history", "/queue", "/system_stats"):
            assert httpx.get(server.url + route).status_code == 401, route
        assert httpx.post(server.url + "/prompt", json={"prompt": workflow()}).status_code == 401
        with pytest.raises(websocket.WebSocketException):
            websocket.create_connection(ws_url, timeout=10).recv()
        answer = httpx.post(server.url + "/prompt", json={"prompt": workflow()}, headers=key)
        assert answer.status_code == 200
        ws = websocket.create_connection(ws_url, timeout=10, header=["Authorization: Bearer s3cret"])
        assert json.loads(ws.recv())["type"] == "status"
        ws.close()


def test_upload_mask_and_output_folder(tiny_pipe, start_server, tmp_path):
    settings = ServerSettings(limits=LIMITS, output_dir=tmp_path)
    with start_server(tiny_pipe, settings) as server:
        client = Client(server.url)
        upload(server.url, gradient(), "photo.png")
        painted = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 255))
        painted.paste((0, 0, 0, 0), (0, 0, SIZE // 4, SIZE))  # the painted strokes: transparent
        reference = json.dumps({"filename": "photo.png", "subfolder": "", "type": "input"})
        answer = httpx.post(
            server.url + "/upload/mask",
            files={"image": ("clipspace-mask.png", png_bytes(painted), "image/png")},
            data={"original_ref": reference, "type": "input", "subfolder": "clipspace"},
        )
        assert answer.json() == {"name": "clipspace-mask.png", "subfolder": "clipspace", "type": "input"}
        view = httpx.get(server.url + "/view", params={**answer.json(), "filename": answer.json()["name"]})
        combined = Image.open(io.BytesIO(view.content))
        assert (
            combined.mode == "RGBA"
            and combined.getpixel((0, 0))[3] == 0
            and combined.getpixel((40, 0))[3] == 255
        )
        assert combined.convert("RGB").tobytes() == gradient().tobytes()

        graph = img2img_graph("clipspace/clipspace-mask.png", denoise=1.0)
        graph["12"] = {
            "class_type": "SetLatentNoiseMask",
            "inputs": {"samples": ["11", 0], "mask": ["10", 1]},
        }
        graph["3"]["inputs"]["latent_image"] = ["12", 0]
        graph["9"]["inputs"]["filename_prefix"] = "runs/inpainted"
        prompt_id, messages = client.run(graph)
        client.close()
        assert "execution_success" in kinds(messages)
        entry = httpx.get(f"{server.url}/history/{prompt_id}").json()[prompt_id]
        (saved,) = entry["outputs"]["9"]["images"]
        assert saved == {"filename": "inpainted_00001_.png", "subfolder": "runs", "type": "output"}
        on_disk = tmp_path / "comfyui" / "runs" / "inpainted_00001_.png"
        assert on_disk.read_bytes() == httpx.get(server.url + "/view", params=saved).content
        bad = {"original_ref": json.dumps({"filename": "nope.png"})}
        answer = httpx.post(
            server.url + "/upload/mask", files={"image": ("m.png", png_bytes(painted), "image/png")}, data=bad
        )
        assert answer.status_code == 422 and "nope.png" in answer.json()["detail"]


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        json.dumps(
            {"prompt": {**workflow(), "9": {**workflow()["9"], "_meta": {"x": float("nan")}}}}
        ).encode(),
        json.dumps({"prompt": workflow(), "number": float("inf")}).encode(),
        b"[" * 100000 + b"]" * 100000,
        json.dumps({"prompt": []}).encode(),
        json.dumps({"prompt": {"1": "node"}}).encode(),
        json.dumps({"prompt": {"1": {"class_type": ["SaveImage"]}}}).encode(),
        json.dumps({"prompt": {"1": {"class_type": "SaveImage", "inputs": []}}}).encode(),
        json.dumps({"prompt": {"9": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}}).encode(),
        json.dumps({"prompt": {"9": {"class_type": "SaveImage", "inputs": {"images": {"a": 1}}}}}).encode(),
        json.dumps({"prompt": {"9": {"class_type": "SaveImage", "inputs": {"images": [[], "0"]}}}}).encode(),
        json.dumps({"prompt": workflow(**{"3": {"model": 5, "seed": {"x": 1}, "cfg": "nan"}})}).encode(),
    ],
)
def test_malformed_prompts_are_refused_not_crashed(comfy_server, body):
    answer = httpx.post(
        comfy_server.url + "/prompt", content=body, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code in (400, 422), answer.text
    assert httpx.get(comfy_server.url + "/prompt").json() == {"exec_info": {"queue_remaining": 0}}


def test_clip_set_last_layer_is_clip_skip(client, tiny_pipe):
    from latentdiffusion.serving.a1111_models import with_clip_skip

    graph = workflow(steps=4, **{"6": {"clip": ["10", 0]}, "7": {"clip": ["10", 0]}})
    graph["10"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -2}}
    prompt_id, _ = client.run(graph)
    (skipped,) = client.images(prompt_id)
    inputs = graph["3"]["inputs"]
    text = (graph["6"]["inputs"]["text"], graph["7"]["inputs"]["text"])
    options = {"sampler": "euler", "sigmas": "trailing"}
    expected = library_image(with_clip_skip(tiny_pipe, 2), *text, inputs["seed"], 4, 8.0, **options)
    assert same_image(skipped, expected)
    assert expected.tobytes() != library_image(tiny_pipe, *text, inputs["seed"], 4, 8.0, **options).tobytes()
    graph["10"]["inputs"]["stop_at_clip_layer"] = -24
    prompt_id, messages = client.run(graph)
    (failure,) = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert failure["node_id"] == "10" and "layers" in failure["exception_message"]


def test_latent_upscale_by_sd3_empty_latent_and_mask_from_a_channel(client):
    graph = workflow(steps=3)
    graph["5"]["class_type"] = "EmptySD3LatentImage"
    graph["10"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["3", 0], "upscale_method": "nearest-exact", "scale_by": 1.5},
    }
    mask = Image.new("RGB", (SIZE, SIZE), (0, 0, 0))
    mask.paste((255, 0, 0), (0, 0, SIZE // 2, SIZE))
    upload(client.url, mask, "red.png")
    graph["11"] = {"class_type": "LoadImageMask", "inputs": {"image": "red.png", "channel": "red"}}
    graph["12"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["10", 0], "mask": ["11", 0]}}
    graph["13"] = {
        "class_type": "KSampler",
        "inputs": {**graph["3"]["inputs"], "latent_image": ["12", 0], "denoise": 0.6},
    }
    graph["8"]["inputs"]["samples"] = ["13", 0]
    prompt_id, messages = client.run(graph)
    assert "execution_success" in kinds(messages), messages[-3:]
    (image,) = client.images(prompt_id)
    assert image.size == (96, 96)
    graph["10"]["inputs"]["scale_by"] = 8.0  # 512 > the limit 256
    prompt_id, messages = client.run(graph)
    (failure,) = [m["data"] for m in messages if m["type"] == "execution_error"]
    assert failure["node_id"] == "10" and "256" in failure["exception_message"]


def test_a_prompts_messages_go_to_its_own_client_only(client, comfy_server):
    other = Client(comfy_server.url)
    try:
        client.run(workflow(steps=2))
        other.ws.settimeout(2)
        seen = []
        with pytest.raises(websocket.WebSocketTimeoutException):
            while True:
                seen.append(json.loads(other.ws.recv()))
        assert seen and {m["type"] for m in seen} == {"status"}  # queue lengths only, no one else's progress
        assert all("prompt_id" not in m["data"] for m in seen)
    finally:
        other.close()


def test_inputs_a_node_does_not_declare_are_ignored(client):
    graph = workflow(steps=2, **{"9": {"extra": ["999", 0], "note": "hello"}})
    prompt_id, messages = client.run(graph)
    assert "execution_success" in kinds(messages)
    assert len(client.images(prompt_id)) == 1


def test_image_scale_before_encoding(client):
    upload(client.url, gradient(100).crop((0, 0, 100, 80)), "wide.png")
    graph = img2img_graph("wide.png", denoise=0.5, steps=2)
    graph["12"] = {
        "class_type": "ImageScale",
        "inputs": {
            "image": ["10", 0],
            "upscale_method": "lanczos",
            "width": SIZE,
            "height": 0,
            "crop": "disabled",
        },
    }
    graph["11"]["inputs"]["pixels"] = ["12", 0]
    prompt_id, _ = client.run(graph)
    (image,) = client.images(prompt_id)
    assert image.size == (SIZE, 48)  # 64 x round(80 * 64 / 100) = 51, cropped to the multiple of 8
    graph["12"]["inputs"].update(upscale_method="bilinear", height=SIZE, crop="center")
    prompt_id, _ = client.run(graph)
    assert client.images(prompt_id)[0].size == (SIZE, SIZE)


@pytest.mark.parametrize(
    ("scheduler", "sampler"),
    [("normal", "dpm_2"), ("beta", "dpm_2_ancestral"), ("kl_optimal", "euler"), ("linear_quadratic", "heun")],
)
def test_every_comfyui_scheduler_runs_with_its_own_step_count(client, tiny_pipe, scheduler, sampler):
    from latentdiffusion.serving.comfy.schedulers import comfy_sigmas

    graph = workflow(steps=12, **{"3": {"scheduler": scheduler, "sampler_name": sampler}})
    prompt_id, messages = client.run(graph)
    assert "execution_success" in kinds(messages), messages[-3:]
    progress = [m["data"]["value"] for m in messages if m["type"] == "progress"]
    levels = comfy_sigmas(scheduler, tiny_pipe.components.process.schedule.sigmas, 12)
    assert progress == list(range(1, len(levels)))  # beta may visit fewer levels than steps
    (image,) = client.images(prompt_id)
    assert image.size == (SIZE, SIZE)
