"""ComfyUI's default workflow on the other families (tiny random SDXL and SD3 models): each family's own
conditioning (SDXL's size conditioning at the latent's size, SD3's three encoders), latent channels
(an empty latent becomes SD3's 16) and noise process (SD3's rectified flow keeps its own levels for
"simple"; a discrete model takes ComfyUI's "simple" levels, the library's "trailing" spacing); the image
is the library's text-to-image image for ComfyUI's noise."""

from __future__ import annotations

import io
import json
import math
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import torch

websocket = pytest.importorskip("websocket", reason="the ComfyUI tests need websocket-client")

sys.path.insert(0, str(Path(__file__).parents[1] / "families"))

from sd3_fixtures import SIZE as SD3_SIZE  # noqa: E402
from sd3_fixtures import TINY_SD3  # noqa: E402

from .conftest import SDXL_SIZE, TEST_LIMITS, running_server  # noqa: E402
from .test_comfy import same_image  # noqa: E402


def default_workflow(ckpt_name: str, size: int, steps: int = 4) -> dict:
    def node(kind: str, **inputs) -> dict:
        return {"class_type": kind, "inputs": inputs}

    sampler = {"seed": 42, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple"}
    links = {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}
    return {
        "3": node("KSampler", **sampler, denoise=1.0, **links),
        "4": node("CheckpointLoaderSimple", ckpt_name=ckpt_name),
        "5": node("EmptyLatentImage", width=size, height=size, batch_size=1),
        "6": node("CLIPTextEncode", text="a red cube on a table", clip=["4", 1]),
        "7": node("CLIPTextEncode", text="blurry", clip=["4", 1]),
        "8": node("VAEDecode", samples=["3", 0], vae=["4", 2]),
        "9": node("SaveImage", filename_prefix="family", images=["8", 0]),
    }


def run_workflow(url: str, graph: dict):
    from PIL import Image

    client_id = uuid.uuid4().hex
    ws = websocket.create_connection(
        url.replace("http://", "ws://") + f"/ws?clientId={client_id}", timeout=60
    )
    try:
        answer = httpx.post(url + "/prompt", json={"prompt": graph, "client_id": client_id}, timeout=30)
        assert answer.status_code == 200, answer.text
        prompt_id = answer.json()["prompt_id"]
        progress = 0
        while True:
            message = json.loads(ws.recv())
            progress += message["type"] == "progress"
            if message["type"] == "executing" and message["data"]["node"] is None:
                break
    finally:
        ws.close()
    entry = httpx.get(f"{url}/history/{prompt_id}").json()[prompt_id]
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"][-1]
    ref = entry["outputs"]["9"]["images"][0]
    return Image.open(io.BytesIO(httpx.get(url + "/view", params=ref).content)), progress


def expected_image(pipe, graph: dict, size: int, sigmas: str | None):
    from latentdiffusion.pipelines.text_to_image import latent_shape

    inputs = graph["3"]["inputs"]
    shape = latent_shape(pipe.components, 1, size, size)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(inputs["seed"]))
    if pipe.components.process.name == "discrete":  # ComfyUI starts at noise * sqrt(1 + sigma_max^2)
        sigma_max = float(pipe.components.process.schedule.sigmas.float()[-1])
        noise = noise * (math.sqrt(1 + sigma_max**2) / sigma_max)
    return pipe.generate(
        graph["6"]["inputs"]["text"],
        graph["7"]["inputs"]["text"],
        size,
        size,
        steps=inputs["steps"],
        guidance_scale=inputs["cfg"],
        sampler="euler",
        sigmas=sigmas,
        latents=noise,
    )[0]


def test_sdxl_default_workflow(sdxl_server):
    pipe = sdxl_server.state.pipe
    graph = default_workflow(pipe.components.name, SDXL_SIZE)
    image, progress = run_workflow(sdxl_server.url, graph)
    assert progress == 4 and image.size == (SDXL_SIZE, SDXL_SIZE)
    assert same_image(image, expected_image(pipe, graph, SDXL_SIZE, "trailing"))


def test_sd3_default_workflow_by_file_name(tmp_path):
    import latentdiffusion as ld
    from latentdiffusion.checkpoints.formats import save_components
    from latentdiffusion.components import build_components
    from latentdiffusion.serving.settings import ServerSettings

    path = tmp_path / "tiny-sd3.safetensors"
    save_components(build_components(TINY_SD3), path, "single-file")
    pipe = ld.load(str(path))
    settings = ServerSettings(limits=TEST_LIMITS, model_source=str(path))
    with running_server(pipe, settings) as server:
        listed = httpx.get(server.url + "/object_info/CheckpointLoaderSimple").json()
        assert "tiny-sd3.safetensors" in listed["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        graph = default_workflow("tiny-sd3.safetensors", SD3_SIZE)
        image, progress = run_workflow(server.url, graph)
    assert progress == 4 and image.size == (SD3_SIZE, SD3_SIZE)
    assert image.convert("RGB").tobytes() == expected_image(pipe, graph, SD3_SIZE, None).tobytes()


def test_checkpoint_loader_switches_among_model_dir_models(tmp_path):
    import latentdiffusion as ld
    from latentdiffusion.components import build_components
    from latentdiffusion.config import get_preset
    from latentdiffusion.pipelines.pipeline import Pipeline
    from latentdiffusion.serving.settings import ServerSettings

    models = tmp_path / "models"
    models.mkdir()
    Pipeline(build_components(get_preset("tiny"), seed=1)).save(models / "one.safetensors", "single-file")
    Pipeline(build_components(get_preset("tiny"), seed=2)).save(models / "two")
    settings = ServerSettings(
        limits=TEST_LIMITS, model_source=str(models / "one.safetensors"), model_dir=models, loader=ld.load
    )
    with running_server(ld.load(str(models / "one.safetensors")), settings) as server:
        listed = httpx.get(server.url + "/object_info/CheckpointLoaderSimple").json()
        offered = listed["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
        assert offered[:2] == ["one.safetensors", "two"]
        graph = default_workflow("two", 64)
        image, _ = run_workflow(server.url, graph)
        two = ld.load(str(models / "two"))
        assert same_image(image, expected_image(two, graph, 64, "trailing"))
        two_graph = default_workflow("two", 64)  # a second checkpoint in one workflow: refused
        two_graph["10"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "one.safetensors"}}
        two_graph["8"]["inputs"]["vae"] = ["10", 2]
        answer = httpx.post(server.url + "/prompt", json={"prompt": two_graph})
        assert answer.status_code == 200
        deadline = time.monotonic() + 60
        while (entry := httpx.get(f"{server.url}/history/{answer.json()['prompt_id']}").json()) == {}:
            assert time.monotonic() < deadline
        (record,) = entry.values()
        assert record["status"]["status_str"] == "error"
        assert "one model" in record["status"]["messages"][-1][1]["exception_message"]
