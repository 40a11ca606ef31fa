"""Textual-inversion embeddings on SD3: an SDXL-style clip_l/clip_g file feeds its two CLIP encoders (by
width, 32 and 48 here); T5 reads the prompt's plain text, as in the web UI."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from sd3_fixtures import TINY_SD3

from latentdiffusion.components import build_components
from latentdiffusion.families.base import ConditioningRequest
from latentdiffusion.pipelines.pipeline import Pipeline


def test_sd3_clip_encoders_take_their_parts(tmp_path):
    pipe = Pipeline(build_components(TINY_SD3))
    vectors = {"clip_l": torch.randn(2, 32), "clip_g": torch.randn(2, 48)}
    save_file(vectors, tmp_path / "my-style.safetensors")
    request = ConditioningRequest(32, 32)
    before, _ = pipe.family.encode(pipe.components, ["a my-style cat"], [""], request)
    embedding = pipe.load_embedding(tmp_path / "my-style.safetensors")
    assert sorted(embedding.vectors) == ["text_encoder", "text_encoder_2"]
    after, _ = pipe.family.encode(pipe.components, ["a my-style cat"], [""], request)
    assert after["context"].shape == before["context"].shape
    assert not torch.equal(after["context"], before["context"])
    plain, _ = pipe.family.encode(pipe.components, ["a cat"], [""], request)
    again, _ = pipe.family.encode(Pipeline(build_components(TINY_SD3)).components, ["a cat"], [""], request)
    torch.testing.assert_close(plain["context"], again["context"])  # other prompts are untouched
