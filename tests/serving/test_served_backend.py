"""The server's generation paths run the U-Net on the served pipeline's backend (``Pipeline.served``): the
web UI's hires fix, its CLIP skip (a view of the pipeline) and ComfyUI's KSampler; each call is counted by
a stand-in backend (``tests.backends.marking``)."""

from __future__ import annotations

import time

import pytest
from tests.backends.marking import MarkingBackend

import latentdiffusion as ld

from .conftest import SIZE, TEST_LIMITS, running_server
from .test_comfy import workflow

httpx = pytest.importorskip("httpx")

from latentdiffusion.serving.settings import ServerSettings  # noqa: E402

FAST = {"prompt": "a red circle", "seed": 4, "steps": 2, "width": SIZE, "height": SIZE}


@pytest.fixture(scope="module")
def served():
    pipe = ld.load("preset:tiny")
    pipe.backend = MarkingBackend()
    with running_server(pipe, ServerSettings(limits=TEST_LIMITS)) as server:
        yield server, pipe.backend


def calls_of(served, post) -> int:
    """The backend's U-Net calls while ``post(url)`` runs (it must answer 200)."""
    server, backend = served
    before = backend.calls
    answer = post(server.url)
    assert answer.status_code == 200, answer.text
    return backend.calls - before


def txt2img(**body):
    return lambda url: httpx.post(url + "/sdapi/v1/txt2img", json={**FAST, **body}, timeout=60)


def test_a1111_hires_fix_runs_both_passes_on_the_backend(served) -> None:
    hires = {"enable_hr": True, "hr_upscaler": "Latent", "hr_second_pass_steps": 2, "denoising_strength": 0.6}
    assert calls_of(served, txt2img(**hires)) >= 2 + 2


def test_a1111_clip_skip_keeps_the_backend(served) -> None:
    assert calls_of(served, txt2img(override_settings={"CLIP_stop_at_last_layers": 2})) >= 2


def comfy_prompt(url: str) -> httpx.Response:
    """Queue the workflow and wait for its history entry (the answer: the history request's)."""
    answer = httpx.post(url + "/prompt", json={"prompt": workflow(steps=2)}, timeout=30)
    assert answer.status_code == 200, answer.text
    prompt_id = answer.json()["prompt_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        history = httpx.get(f"{url}/history/{prompt_id}", timeout=30)
        entry = history.json().get(prompt_id)
        if entry and entry["status"].get("completed") is not None:
            assert entry["status"]["status_str"] == "success", entry["status"]
            return history
        time.sleep(0.1)
    raise AssertionError("the workflow did not finish in 60 s")


def test_comfy_ksampler_runs_on_the_backend(served) -> None:
    assert calls_of(served, comfy_prompt) >= 2
