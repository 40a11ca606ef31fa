"""The AUTOMATIC1111-compatible /sdapi/v1 routes over plain HTTP (httpx), as that API's clients call them."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
from PIL import Image

from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters
from latentdiffusion.serving.settings import ServerSettings

SLOW = {"prompt": "slow", "steps": 150, "width": 256, "height": 256, "seed": 1}  # interrupted or cancelled


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def test_txt2img_fields_and_response_shape(http):
    body = {
        "prompt": "a red circle",
        "negative_prompt": "blurry",
        "seed": 11,
        "sampler_name": "DPM++ 2M Karras",
        "batch_size": 2,
        "steps": 2,
        "cfg_scale": 5,
        "width": 64,
        "height": 48,
        "styles": [],  # a field we ignore but echo
    }
    response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200
    data = response.json()
    assert set(data) == {"images", "parameters", "info"}
    assert data["parameters"]["prompt"] == "a red circle" and data["parameters"]["styles"] == []
    info = json.loads(data["info"])
    assert info["all_seeds"] == [11, 12] and info["sampler_name"] == "DPM++ 2M Karras"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (64, 48, 2, 5)
    images = [decode(b64) for b64 in data["images"]]
    assert [image.size for image in images] == [(64, 48)] * 2
    parsed = parse_parameters(images[1].info["parameters"])
    assert parsed["negative_prompt"] == "blurry"
    assert parsed["settings"]["Seed"] == "12" and parsed["settings"]["Sampler"] == "DPM++ 2M Karras"
    assert info["infotexts"][1] == images[1].info["parameters"]


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        ({"sampler_name": "Euler a"}, "Euler a"),
        ({"sampler_index": "k_lms"}, "LMS"),
        ({"sampler_name": "DPM++ 2M", "scheduler": "karras"}, "DPM++ 2M Karras"),
        ({"sampler_name": "heun"}, "Heun"),
    ],
)
def test_sampler_names_of_the_web_ui_and_ours(http, fields, shown):
    data = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, **fields}).json()
    assert json.loads(data["info"])["sampler_name"] == shown


def test_img2img_keeps_the_input_size_and_inpainting_keeps_the_unmasked_pixels(http, picture):
    init = picture.resize((48, 64))
    data = http.post(
        "/sdapi/v1/img2img", json={"init_images": [b64png(init)], "steps": 2, "prompt": "x"}
    ).json()
    assert decode(data["images"][0]).size == (48, 64)
    assert data["parameters"]["init_images"] is None  # not echoed unless include_init_images

    mask = Image.new("L", picture.size, 0)
    mask.paste(255, (24, 24, 40, 40))
    body = {
        "init_images": ["data:image/png;base64," + b64png(picture)],  # browsers send data URLs
        "mask": b64png(mask),
        "prompt": "a blue square",
        "steps": 2,
        "denoising_strength": 1.0,
        "inpaint_full_res": False,
        "include_init_images": True,
    }
    data = http.post("/sdapi/v1/img2img", json=body).json()
    out = decode(data["images"][0]).convert("RGB")
    assert out.getpixel((0, 0)) == picture.getpixel((0, 0))
    assert out.getpixel((32, 32)) != picture.getpixel((32, 32))
    assert data["parameters"]["mask"] == body["mask"]
    assert "Mask blur: 4" in json.loads(data["info"])["infotexts"][0]


def test_img2img_resizes_the_input_to_width_and_height(http, picture):
    body = {"init_images": [b64png(picture)], "steps": 1, "width": 32, "height": 40}
    data = http.post("/sdapi/v1/img2img", json=body).json()
    assert decode(data["images"][0]).size == (32, 40)


def test_listing_routes(http):
    samplers = http.get("/sdapi/v1/samplers").json()
    euler_a = next(s for s in samplers if s["name"] == "Euler a")
    assert "euler_ancestral" in euler_a["aliases"] and "k_euler_a" in euler_a["aliases"]
    models = http.get("/sdapi/v1/sd-models").json()
    assert [(m["model_name"], m["family"], m["sample_size"]) for m in models] == [("tiny", "sd", 64)]
    assert {s["name"] for s in http.get("/sdapi/v1/schedulers").json()} == {
        "automatic",
        "karras",
        "exponential",
    }
    idle = http.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["current_image"] is None and idle["state"]["job_count"] == 0
    schema = http.get("/openapi.json").json()
    assert {"/sdapi/v1/txt2img", "/v1/images/generations", "/health"} <= set(schema["paths"])


def test_progress_preview_and_interrupt(server, http):
    results = {}

    def generate():
        results["response"] = httpx.post(
            f"{server.url}/sdapi/v1/txt2img", json={**SLOW, "force_task_id": "task-1"}, timeout=60
        )

    thread = threading.Thread(target=generate)
    thread.start()

    def advanced():
        results["progress"] = http.get("/sdapi/v1/progress", params={"id_task": "task-1"}).json()
        return results["progress"]["progress"] > 0 and results["progress"]["current_image"]

    wait_for(advanced)
    progress = results["progress"]
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    assert progress["eta_relative"] > 0
    assert decode(progress["current_image"]).size == (256, 256)  # a preview at the image's size
    assert http.post("/sdapi/v1/interrupt").json() == {}
    thread.join(60)
    data = results["response"].json()
    assert results["response"].status_code == 200
    assert json.loads(data["info"])["interrupted"] is True
    assert decode(data["images"][0]).size == (256, 256)  # the estimate it had reached
    assert server.state.queue.stats()["interrupted"] >= 1


def raw_request(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST and keep the connection open without reading the answer."""
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port))
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def test_a_client_that_disconnects_cancels_its_job(server):
    queue = server.state.queue
    before = queue.stats()
    running = raw_request(server.url, "/sdapi/v1/txt2img", SLOW)
    wait_for(lambda: queue.running is not None and queue.running.step > 0)
    waiting = raw_request(server.url, "/sdapi/v1/txt2img", {**SLOW, "seed": 2})
    wait_for(lambda: queue.waiting == 1)
    waiting.close()  # a waiting job leaves the queue
    wait_for(lambda: queue.waiting == 0, timeout=5)
    running.close()  # a running job stops at its next step
    wait_for(lambda: queue.running is None, timeout=5)
    after = queue.stats()
    assert after["cancelled"] - before["cancelled"] == 2
    assert after["completed"] == before["completed"]


def test_images_are_saved_with_their_parameters(tiny_pipe, start_server, tmp_path):
    settings = ServerSettings(output_dir=tmp_path / "out")
    with start_server(tiny_pipe, settings) as server:
        body = {"prompt": "saved", "steps": 1, "seed": 42, "batch_size": 2}
        assert httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60).status_code == 200
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["00000-42.png", "00001-43.png"]
    assert parse_parameters(read_parameters(tmp_path / "out" / files[1]))["settings"]["Seed"] == "43"
