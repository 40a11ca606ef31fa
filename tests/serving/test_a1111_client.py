"""The AUTOMATIC1111 routes as the real ``webuiapi`` client (0.9.17) calls them: every route it wraps
that the server offers, with exact answers from the library where there is one (the same image from
``Pipeline`` calls, sha256 hashes of the files, weights bit for bit after a LoRA request)."""

from __future__ import annotations

import base64
import hashlib
import io
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.checkpoints.network_lora import save_model_lora
from latentdiffusion.components import build_components
from latentdiffusion.config import get_preset
from latentdiffusion.models.lora import inject_lora, lora_state_dict
from latentdiffusion.models.text_encoder import TextEncoder
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.serving.settings import ServerSettings

from .conftest import TEST_LIMITS, gradient

webuiapi = pytest.importorskip("webuiapi", reason="the A1111 client tests need webuiapi (test extra)")

FAST = {"steps": 2, "width": 64, "height": 64, "sampler_name": "Euler a", "cfg_scale": 7}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def same(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(pixels(a), pixels(b))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> dict[str, Path]:
    """A models folder (a single file and a native folder of two different tiny models) and a LoRA."""
    root = tmp_path_factory.mktemp("a1111")
    models, loras = root / "models", root / "loras"
    models.mkdir()
    loras.mkdir()
    Pipeline(build_components(get_preset("tiny"), seed=1)).save(models / "one.safetensors", "single-file")
    Pipeline(build_components(get_preset("tiny"), seed=2)).save(models / "two")
    components = build_components(get_preset("tiny"), seed=3)
    adapted = inject_lora(components.modules, ("attention", "text"), rank=2)
    states = {role: lora_state_dict(components.modules[role]) for role in adapted}
    generator = torch.Generator().manual_seed(0)
    for state in states.values():
        for key, value in state.items():
            if "lora_up" in key:  # zero-initialised: randomise, or the LoRA changes nothing
                value.copy_(0.5 * torch.randn(value.shape, generator=generator))
    save_model_lora(
        loras / "style.safetensors",
        components.family,
        states,
        components.config,
        metadata={"ss_output_name": "stylish"},
    )
    return {"models": models, "loras": loras, "one": models / "one.safetensors", "two": models / "two"}


def settings_for(library: dict[str, Path]) -> ServerSettings:
    return ServerSettings(
        limits=TEST_LIMITS,
        model_source=str(library["one"]),
        model_dir=library["models"],
        lora_dir=library["loras"],
        loader=ld.load,
    )


@pytest.fixture(scope="module")
def served(library):
    from .conftest import running_server

    with running_server(ld.load(str(library["one"])), settings_for(library)) as server:
        yield server


def client(server) -> webuiapi.WebUIApi:
    return webuiapi.WebUIApi(baseurl=f"{server.url}/sdapi/v1", sampler="Euler a", steps=2)


@pytest.fixture
def api(served) -> webuiapi.WebUIApi:
    return client(served)


def test_txt2img_carries_the_model_hash_everywhere(api, library):
    result = api.txt2img(prompt="a red circle", seed=3, **FAST)
    short = sha256(library["one"])[:10]
    assert result.info["sd_model_hash"] == short and result.info["sd_model_name"] == "one"
    text = result.image.info["parameters"]
    assert f"Model hash: {short}, Model: " in text and result.info["infotexts"] == [text]
    models = {m["model_name"]: m for m in api.get_sd_models()}
    assert set(models) == {"one", "two"}
    assert models["one"]["title"] == f"one.safetensors [{short}]"
    assert (models["one"]["hash"], models["one"]["sha256"]) == (short, sha256(library["one"]))
    assert models["two"]["hash"] is None  # as in the web UI: hashed when first loaded
    assert api.get_options()["sd_model_checkpoint"] == models["one"]["title"]
    assert api.util_get_current_model() == models["one"]["title"]


def test_png_info_reads_the_parameters_back(api):
    result = api.txt2img(prompt="a blue square", negative_prompt="blurry", seed=8, **FAST)
    read = api.png_info(result.image)
    assert read.info == result.image.info["parameters"]
    assert read.parameters["Prompt"] == "a blue square" and read.parameters["Negative prompt"] == "blurry"
    assert (read.parameters["Seed"], read.parameters["Size-1"], read.parameters["Steps"]) == ("8", "64", "2")


def test_options_refuse_what_is_not_honoured_and_accept_unchanged_values(api):
    assert api.set_options({"samples_format": "png", "sd_vae": "Automatic"}) is None
    answer = api.set_options({"save_images_add_number": False, "samples_format": "png"})
    assert "save_images_add_number" in answer["detail"]
    answer = api.set_options({"CLIP_stop_at_last_layers": 99})
    assert "CLIP_stop_at_last_layers" in answer["detail"]
    assert "sd_model_checkpoint" in api.set_options({"sd_model_checkpoint": "three"})["detail"]
    assert api.get_options()["CLIP_stop_at_last_layers"] == 1


def test_switching_models_releases_the_old_one_and_comes_back_exactly(library, start_server):
    with start_server(ld.load(str(library["one"])), settings_for(library)) as server:
        api = client(server)
        first = api.txt2img(prompt="a", seed=1, **FAST).image
        old = server.state.pipe
        running = {}
        slow = threading.Thread(
            target=lambda: running.update(r=api.txt2img(prompt="a", seed=1, **{**FAST, "steps": 40}))
        )
        slow.start()
        deadline = time.monotonic() + 30
        while server.state.queue.running is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        api.util_set_model("two")  # webuiapi's helper: the closest title, then POST /options
        slow.join(60)  # the switch waited for the running job, which the first model finished
        assert running["r"].info["sd_model_name"] == "one"
        assert running["r"].info["sd_model_hash"] == sha256(library["one"])[:10]
        assert next(old.unet.parameters()).device.type == "meta"  # the old weights are freed
        two = {m["model_name"]: m for m in api.get_sd_models()}["two"]
        assert two["hash"] is not None and api.get_options()["sd_model_checkpoint"] == two["title"]
        other = api.txt2img(prompt="a", seed=1, **FAST)
        assert other.info["sd_model_name"] == "two" and not same(first, other.image)
        api.set_options({"sd_model_checkpoint": sha256(library["one"])[:10]})  # by short hash
        assert same(first, api.txt2img(prompt="a", seed=1, **FAST).image)


def clip_skipped(path: Path, clip_skip: int) -> Pipeline:
    """The oracle: a text encoder built with ``clip_skip - 1`` layers fewer, loaded from the model."""
    pipe = ld.load(str(path))
    encoder = pipe.components.modules["text_encoder"]
    config = replace(encoder.config, skip_last_layers=clip_skip - 1)
    cut = TextEncoder(config)
    cut.load_state_dict(encoder.state_dict(), strict=False)  # the skipped layers' weights are unused
    modules = {**pipe.components.modules, "text_encoder": cut}
    components = replace(pipe.components, modules=modules, config=replace(pipe.config, text_encoder=config))
    return Pipeline(components)


def test_clip_skip_per_request_and_as_an_option(api, library):
    expected = clip_skipped(library["one"], 2).generate(
        "a cat", steps=2, sampler="euler_ancestral", guidance_scale=7, seed=5, width=64, height=64
    )[0]
    plain = api.txt2img(prompt="a cat", seed=5, **FAST).image
    once = api.txt2img(prompt="a cat", seed=5, override_settings={"CLIP_stop_at_last_layers": 2}, **FAST)
    assert same(once.image, expected) and not same(plain, expected)
    assert "Clip skip: 2" in once.image.info["parameters"] and once.info["clip_skip"] == 2
    assert api.set_options({"CLIP_stop_at_last_layers": 2}) is None
    try:
        assert api.get_options()["CLIP_stop_at_last_layers"] == 2
        assert same(api.txt2img(prompt="a cat", seed=5, **FAST).image, expected)
    finally:
        api.set_options({"CLIP_stop_at_last_layers": 1})
    assert same(api.txt2img(prompt="a cat", seed=5, **FAST).image, plain)


def test_lora_tags_merge_for_one_request_and_restore_the_weights(api, served, library):
    assert [(x["name"], x["alias"]) for x in api.get_loras()] == [("style", "stylish")]
    before = {k: v.clone() for k, v in served.state.pipe.unet.state_dict().items()}
    before_text = {k: v.clone() for k, v in served.state.pipe.text_encoder.state_dict().items()}
    result = api.txt2img(prompt="a <lora:style:0.5>", seed=2, **FAST)
    merged = ld.load(str(library["one"]))
    merged.load_lora(library["loras"] / "style.safetensors", 0.5)
    expected = merged.generate(
        "a ", steps=2, sampler="euler_ancestral", guidance_scale=7, seed=2, width=64, height=64
    )[0]
    assert same(result.image, expected)
    assert not same(result.image, api.txt2img(prompt="a ", seed=2, **FAST).image)
    after, after_text = served.state.pipe.unet.state_dict(), served.state.pipe.text_encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(before_text[k], after_text[k]) for k in before_text)
    text = result.image.info["parameters"]
    assert text.startswith("a <lora:style:0.5>\n")  # the prompt as sent
    assert "Lora hashes: " in text and "stylish: " in text
    with pytest.raises(RuntimeError, match="no LoRA of that name"):
        api.txt2img(prompt="a <lora:nope:1>", **FAST)
    with pytest.raises(RuntimeError, match="hypernet"):
        api.txt2img(prompt="a <hypernet:x:1>", **FAST)


def test_lora_hash_is_the_web_uis_addnet_hash(api, library):
    path = library["loras"] / "style.safetensors"
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + header :]).hexdigest()[:12]
    text = api.txt2img(prompt="b <lora:stylish>", seed=1, **FAST).image.info["parameters"]
    assert f'Lora hashes: "stylish: {expected}"' in text


def test_subseeds_are_variation_seeds(api, library):
    from latentdiffusion.diffusion.noise import variation_noise

    result = api.txt2img(prompt="a", seed=5, subseed=9, subseed_strength=0.3, batch_size=2, **FAST)
    pipe = ld.load(str(library["one"]))
    options = {"steps": 2, "sampler": "euler_ancestral", "guidance_scale": 7, "width": 64, "height": 64}
    shape = (1, 4, 32, 32)  # the tiny model's latent at 64x64
    noise = torch.cat([variation_noise(shape, [5 + i], 9 + i, 0.3) for i in range(2)])
    batch = pipe.generate("a", seed=5, num_images=2, latents=noise, **options)
    for i, image in enumerate(result.images):
        assert same(image, batch[i])  # image i moves towards subseed + i, as the web UI's subseeds
        alone = pipe.generate("a", seed=5 + i, variation_seed=9 + i, variation_strength=0.3, **options)[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 1  # batch of one: rounding only
        assert f"Variation seed: {9 + i}, Variation seed strength: 0.3" in image.info["parameters"]
    assert result.info["all_subseeds"] == [9, 10] and result.info["subseed_strength"] == 0.3
    plain = api.txt2img(prompt="a", seed=5, subseed=9, subseed_strength=0, **FAST).image
    assert np.abs(pixels(plain) - pixels(result.images[0])).max() > 10


def test_hires_fix_latent_and_image_upscalers(api, library):
    from latentdiffusion.pipelines.hires import Hires, hires_fix

    result = api.txt2img(
        prompt="a",
        seed=4,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="Latent",
        hr_second_pass_steps=2,
        denoising_strength=0.6,
        **{**FAST, "height": 48},
    )
    assert result.image.size == (128, 96)
    text = result.image.info["parameters"]
    for part in (
        "Size: 64x48",
        "Denoising strength: 0.6",
        "Hires upscale: 2",
        "Hires steps: 2",
        "Hires upscaler: Latent",
    ):
        assert part in text
    pipe = ld.load(str(library["one"]))
    hires = Hires(scale=2, upscaler="Latent", steps=2, strength=0.6)
    expected, _, _ = hires_fix(
        pipe.components, "a", "", 64, 48, hires, steps=2, sampler="euler_ancestral", guidance_scale=7, seed=4
    )
    assert same(result.image, expected[0])
    cropped = api.txt2img(
        prompt="a",
        seed=4,
        enable_hr=True,
        hr_upscaler="Lanczos",
        hr_resize_x=96,
        hr_resize_y=64,
        denoising_strength=0.5,
        **{**FAST, "height": 48},
    )
    assert cropped.image.size == (96, 64) and "Hires resize: 96x64" in cropped.image.info["parameters"]
    plain = api.txt2img(
        prompt="a", seed=4, enable_hr=True, hr_upscaler="None", hr_second_pass_steps=1, **FAST
    )
    assert plain.image.size == (128, 128)  # the web UI's None: a plain (Lanczos) resize before the pass
    with pytest.raises(RuntimeError, match="hr_upscaler"):
        api.txt2img(prompt="a", enable_hr=True, hr_upscaler="R-ESRGAN 4x+", **FAST)
    assert [m["name"] for m in api.get_latent_upscale_modes()][:2] == ["Latent", "Latent (antialiased)"]


def test_an_interrupted_job_records_the_steps_it_reached(api, served):
    results = {}
    thread = threading.Thread(
        target=lambda: results.update(r=api.txt2img(prompt="slow", seed=1, steps=150, width=128, height=128))
    )
    thread.start()
    deadline = time.monotonic() + 30
    while served.state.queue.running is None or served.state.queue.running.step < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    api.interrupt()
    thread.join(60)
    result = results["r"]
    reached = result.info["steps"]
    assert result.info["interrupted"] and 2 <= reached < 150
    text = result.image.info["parameters"]
    assert f"Steps: {reached}," in text and f"Interrupted at step: {reached}/150" in text
    assert "Model hash: " in text and result.info["infotexts"] == [text]


def test_extras_with_resamplers(api, picture):
    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    doubled = api.extra_single_image(picture, upscaler_1="Lanczos", upscaling_resize=2).image
    assert same(doubled, picture.resize((128, 128), Image.Resampling.LANCZOS))
    assert same(api.extra_single_image(picture).image, picture)  # upscaler_1 None: as it is
    cropped = api.extra_single_image(
        picture, resize_mode=1, upscaler_1="Nearest", upscaling_resize_w=96, upscaling_resize_h=64
    ).image
    assert cropped.size == (96, 64)
    batch = api.extra_batch_images([picture, gradient((32, 32))], upscaler_1="Nearest", upscaling_resize=2)
    assert [image.size for image in batch.images] == [(128, 128), (64, 64)]
    with pytest.raises(RuntimeError, match="face restoration"):
        api.extra_single_image(picture, gfpgan_visibility=0.5)


def test_the_shipped_upscaler_is_offered_with_the_shipped_model(start_server):
    try:
        upscaler = ld.load("upscaler")
        model = ld.load("default")
    except Exception as error:  # not installed in this checkout
        pytest.skip(f"shipped models missing: {error}")
    with start_server(model, ServerSettings(limits=TEST_LIMITS, model_source="default")) as server:
        api = client(server)
        names = [u["name"] for u in api.get_upscalers()]
        assert names == ["None", "Lanczos", "Nearest", "LDM x4 (shapes)"]
        small = gradient((16, 16))
        result = api.extra_single_image(small, upscaler_1="LDM x4 (shapes)", upscaling_resize=4).image
        assert same(result, upscaler.upscale(small, "", seed=0)[0])
        hires = {"enable_hr": True, "hr_upscaler": "LDM x4 (shapes)", "hr_second_pass_steps": 1}
        fast = {**FAST, "width": 32, "height": 32}
        made = api.txt2img(prompt="a red circle", seed=1, hr_scale=2, **hires, **fast).image
        assert made.size == (64, 64) and "Hires upscaler: LDM x4 (shapes)" in made.info["parameters"]


def test_listings_system_routes_and_refusals(api, served, library):
    assert api.get_sd_vae() == [] and api.get_prompt_styles() == [] and api.get_hypernetworks() == []
    assert api.get_embeddings() == {"loaded": {}, "skipped": {}}
    assert api.get_scripts() == {"txt2img": [], "img2img": []}
    assert api.get_face_restorers() == [] and api.get_realesrgan_models() == []
    memory = api.get_memory()
    assert memory["ram"]["total"] > memory["ram"]["free"] > 0 and "cuda" in memory
    flags = api.get_cmd_flags()
    assert flags["model_dir"] == str(library["models"]) and flags["api_auth"] is False
    assert api.skip() == {}
    assert api.get_progress()["state"]["job_count"] == 0
    for fields, name in (
        ({"styles": ["cinematic"]}, "styles"),
        ({"restore_faces": True}, "restore_faces"),
        ({"script_name": "x/y/z plot"}, "script_name"),
        ({"override_settings": {"sd_model_checkpoint": "two"}}, "sd_model_checkpoint"),
    ):
        with pytest.raises(RuntimeError, match=name):
            api.txt2img(prompt="a", **fields, **FAST)


def test_refresh_unload_and_reload(library, start_server, tmp_path):
    import shutil

    folder = tmp_path / "models"
    shutil.copytree(library["models"], folder)
    settings = replace(settings_for(library), model_dir=folder, model_source=str(folder / "one.safetensors"))
    with start_server(ld.load(settings.model_source), settings) as server:
        api = client(server)
        first = api.txt2img(prompt="a", seed=1, **FAST).image
        shutil.copy(folder / "one.safetensors", folder / "three.safetensors")
        assert "three" not in {m["model_name"] for m in api.get_sd_models()}
        api.refresh_checkpoints()
        assert "three" in {m["model_name"] for m in api.get_sd_models()}
        assert api.custom_post("unload-checkpoint", baseurl=True).json["loaded"] is False
        assert next(server.state.pipe.unet.parameters()).device.type == "meta"
        assert same(first, api.txt2img(prompt="a", seed=1, **FAST).image)  # read again first
        api.custom_post("unload-checkpoint", baseurl=True)
        assert api.custom_post("reload-checkpoint", baseurl=True).json["loaded"] is True
        assert next(server.state.pipe.unet.parameters()).device.type == "cpu"


def test_ldm_serve_model_dir_starts_with_a_named_model_and_loads_others_alike(library, monkeypatch):
    import uvicorn

    import latentdiffusion.serving.app as app_module
    from latentdiffusion.cli.main import main

    seen = {}
    monkeypatch.setattr(
        app_module, "create_app", lambda pipe, settings: seen.update(pipe=pipe, settings=settings)
    )
    monkeypatch.setattr(app_module, "server_config", lambda *args, **kwargs: None)
    monkeypatch.setattr(uvicorn, "Server", lambda config: type("Idle", (), {"run": lambda self: None})())
    folder = str(library["models"])
    lora_dir = str(library["loras"])
    assert (
        main(
            ["serve", "--model-dir", folder, "--model", "two", "--lora-dir", lora_dir, "--precision", "fp32"]
        )
        == 0
    )
    settings = seen["settings"]
    assert settings.model_dir == library["models"] and settings.model_source == str(library["two"])
    expected = ld.load(str(library["two"])).unet.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in seen["pipe"].unet.state_dict().items())
    assert settings.loader(str(library["one"])).components.name == "one"
    assert main(["serve", "--model-dir", str(library["one"])]) == 2  # not a folder: one line, exit 2


def test_img2img_and_inpainting_through_webuiapi(api, picture, library):
    from latentdiffusion.diffusion.noise import variation_noise

    fields = {"steps": 4, "cfg_scale": 7, "width": 64, "height": 64, "denoising_strength": 0.6}
    result = api.img2img(
        images=[picture], prompt="a <lora:style:0.5>", seed=3, subseed=7, subseed_strength=0.2, **fields
    )
    pipe = ld.load(str(library["one"]))
    pipe.load_lora(library["loras"] / "style.safetensors", 0.5)
    noise = variation_noise((1, 4, 32, 32), [3], 7, 0.2)
    expected = pipe.img2img(
        picture,
        "a ",
        strength=0.6,
        steps=4,
        sampler="euler_ancestral",
        guidance_scale=7,
        seed=3,
        latents=noise,
    )[0]
    assert same(result.image, expected)
    text = result.image.info["parameters"]
    for part in ("Denoising strength: 0.6", "Model hash: ", "Variation seed: 7", "Lora hashes: "):
        assert part in text
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (24, 24, 40, 40))
    inpainted = api.img2img(
        images=[picture], mask_image=mask, prompt="b", seed=1, inpaint_full_res=False, **fields
    )
    assert np.array_equal(pixels(inpainted.image)[:8, :8], pixels(picture)[:8, :8])  # pasted back
    with pytest.raises(RuntimeError, match="resize_mode"):
        api.img2img(images=[picture], resize_mode=1, **fields)


def test_token_merging_per_request_as_the_web_ui_sets_it(api, picture, library):
    pipe = ld.load(str(library["one"]))
    options = {"steps": 2, "sampler": "euler_ancestral", "guidance_scale": 7, "seed": 5}
    expected = pipe.generate("a cat", width=64, height=64, token_merging=0.5, **options)[0]
    made = api.txt2img(prompt="a cat", seed=5, override_settings={"token_merging_ratio": 0.5}, **FAST).image
    assert same(made, expected) and "Token merging ratio: 0.5" in made.info["parameters"]
    assert not same(made, api.txt2img(prompt="a cat", seed=5, **FAST).image)
    assert api.get_options()["token_merging_ratio"] == 0.0
    fields = {"steps": 2, "cfg_scale": 7, "width": 64, "height": 64, "denoising_strength": 0.6}
    ratios = {"token_merging_ratio": 0.25, "token_merging_ratio_img2img": 0.5}  # img2img's own wins
    edited = api.img2img(images=[picture], prompt="b", seed=3, override_settings=ratios, **fields).image
    expected = pipe.img2img(picture, "b", strength=0.6, token_merging=0.5, **{**options, "seed": 3})[0]
    assert same(edited, expected)
    for overrides, name in (
        ({"token_merging_ratio": 0.9}, "override_settings.token_merging_ratio"),
        ({"token_merging_ratio": "half"}, "override_settings.token_merging_ratio"),
    ):
        with pytest.raises(RuntimeError, match=name):
            api.txt2img(prompt="a", override_settings=overrides, **FAST)
    hires = {"enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent", "seed": 2, **FAST}
    merged = [
        api.txt2img(prompt="a", override_settings={"token_merging_ratio": 0.5}, **hires).image for _ in "ab"
    ]
    plain = api.txt2img(prompt="a", **hires).image
    assert same(*merged) and not same(merged[0], plain) and merged[0].size == plain.size == (128, 128)
    assert (
        "Token merging ratio: 0.5" in merged[0].info["parameters"]
        and "Hires upscale: 2" in merged[0].info["parameters"]
    )


def test_sampler_scheduler_and_controlnet_listings_through_webuiapi(api):
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    # the title gains its "[short hash]" once the file is hashed (checked in the txt2img hash test)
    assert api.util_get_model_names()[0].startswith("one.safetensors")
    assert api.controlnet_version() and isinstance(api.controlnet_model_list(), list)
    assert "none" in api.controlnet_module_list()
    api.util_wait_for_ready(check_interval=0.1)


def test_hires_fix_on_sdxl_and_unload_without_a_loader(sdxl_server):
    import httpx

    from .conftest import SDXL_SIZE

    with httpx.Client(base_url=sdxl_server.url, timeout=60) as http:
        body = {"prompt": "a", "steps": 1, "enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 1}
        data = http.post("/sdapi/v1/txt2img", json={**body, "original_size": [64, 64]}).json()
        image = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
        assert image.size == (2 * SDXL_SIZE, 2 * SDXL_SIZE) and "Hires upscale: 2" in image.info["parameters"]
        refused = http.post("/sdapi/v1/unload-checkpoint")
        assert refused.status_code == 422 and "no loader" in refused.json()["detail"]
        answer = http.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2})
        assert answer.status_code == 422 and "fixed layers" in answer.json()["detail"]  # SDXL: no CLIP skip
