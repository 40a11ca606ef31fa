"""The server's video route uses the prompt words learned with a motion module (``NAME.embeddings/``
beside its file) for that module's clips only."""

from __future__ import annotations

import base64

import httpx
import pytest
import torch

from latentdiffusion.checkpoints.motion_keys import save_motion_modules
from latentdiffusion.embeddings import embedding_roles, loaded_embeddings, save_embedding
from latentdiffusion.models.motion import MotionConfig, MotionModules
from latentdiffusion.serving.settings import ServerSettings

from .conftest import TEST_LIMITS, running_server


@pytest.fixture(scope="module")
def words_server(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("motion-words")
    torch.manual_seed(0)
    modules = MotionModules(MotionConfig(block_channels=(32, 64), layers=1, max_frames=24))
    for name in ("plain", "worded"):  # the same weights; only "worded" has words beside it
        save_motion_modules(modules, folder / f"{name}.safetensors")
    widths = embedding_roles(tiny_pipe.components)
    vectors = {role: torch.randn(1, width) * 3 for role, width in widths.items()}
    save_embedding(folder / "worded.embeddings" / "red.safetensors", vectors, "red", 1)
    with running_server(tiny_pipe, ServerSettings(limits=TEST_LIMITS, motion_dir=folder)) as running:
        yield running


def clip(server, module: str) -> bytes:
    body = {"prompt": "a red circle", "motion_module": module, "frames": 3, "steps": 2, "seed": 4}
    response = httpx.post(server.url + "/v1/videos/generations", json=body | {"format": "apng"}, timeout=60)
    assert response.status_code == 200, response.text
    return base64.b64decode(response.json()["data"][0]["b64_json"])


def test_a_module_brings_its_words(words_server, tiny_pipe):
    listed = httpx.get(words_server.url + "/v1/motion-modules").json()["data"]
    assert [entry["id"] for entry in listed] == ["plain.safetensors", "worded.safetensors"]
    assert clip(words_server, "worded") != clip(words_server, "plain")
    assert clip(words_server, "plain") == clip(words_server, "plain")  # (the comparison can hold)
    assert "red" not in {e.name for e in loaded_embeddings(tiny_pipe.components)}  # clips only
