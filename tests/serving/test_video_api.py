"""``POST /v1/videos/generations`` and ``GET /v1/motion-modules``: a clip from the tiny model and a tiny
motion module of ``--motion-dir``, its progress previews and interrupt, and refused requests."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest
import torch
from PIL import Image, ImageSequence

from latentdiffusion.checkpoints.motion_keys import save_motion_modules
from latentdiffusion.models.motion import MotionConfig, MotionModules
from latentdiffusion.serving.settings import ServerSettings

from .conftest import TEST_LIMITS, running_server


@pytest.fixture(scope="module")
def video_server(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("motion-modules")
    modules = MotionModules(MotionConfig(block_channels=(32, 64), layers=1, max_frames=24))
    with torch.no_grad():
        for parameter in modules.parameters():
            parameter.normal_(0, 0.1)
    save_motion_modules(modules, folder / "mm_tiny_v1.safetensors")
    (folder / "notes.txt").write_text("not a module")
    with running_server(tiny_pipe, ServerSettings(limits=TEST_LIMITS, motion_dir=folder)) as running:
        yield running


def post(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/videos/generations", json=body, timeout=60)


def frames_of(answer: dict) -> list[Image.Image]:
    clip = Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"])))
    return [frame.copy() for frame in ImageSequence.Iterator(clip)]


def test_modules_of_the_folder_are_listed(video_server):
    answer = httpx.get(video_server.url + "/v1/motion-modules").json()
    assert [entry["id"] for entry in answer["data"]] == ["mm_tiny_v1.safetensors"]


def test_a_prompt_makes_a_clip(video_server):
    response = post(
        video_server,
        prompt="a red circle",
        motion_module="MM_TINY_V1",
        frames=5,
        steps=2,
        seed=4,
        format="apng",
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["format"], answer["frames"], answer["seed"], answer["size"]) == ("apng", 5, 4, "64x64")
    frames = frames_of(answer)
    assert 1 <= len(frames) <= 5 and frames[0].size == (64, 64)  # identical neighbours may merge


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"motion_module": "missing"}, "unknown motion module 'missing'; offered: mm_tiny_v1.safetensors"),
        ({"motion_module": "notes"}, "unknown motion module"),
        ({"frames": 65}, "frames"),
        ({"frames": 30, "context": None}, "at most 24 at once"),
        ({"size": "1000x64"}, "size width"),
        ({"format": "avi"}, "format"),
    ],
)
def test_bad_requests_are_refused_by_field(video_server, body, field):
    response = post(video_server, **{"prompt": "x", "motion_module": "mm_tiny_v1", "steps": 1, **body})
    assert 400 <= response.status_code < 500
    assert field in response.text


def test_an_interrupted_clip_answers_its_frames_estimate(video_server):
    results = {}

    def call() -> None:
        results["r"] = post(video_server, prompt="x", motion_module="mm_tiny_v1", frames=3, steps=150)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 30
    queue = video_server.state.queue
    while queue.running is None or queue.running.step < 2:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    assert httpx.get(video_server.url + "/sdapi/v1/progress").status_code == 200  # previews a frame
    assert httpx.post(video_server.url + "/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    assert results["r"].status_code == 200
    assert results["r"].json()["frames"] == 3
