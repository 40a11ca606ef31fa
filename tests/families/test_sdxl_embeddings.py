"""Textual-inversion embeddings on SDXL: a clip_l/clip_g file feeds each text encoder the part of its width
(64 and 128 here), with the token ids and prompt embeddings of diffusers' pipeline; a file with one part
or of another width is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.prompts import frame, prompt_chunks

WORD = "my-style"


def parts(n: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(n)
    return {
        "clip_l": torch.randn(n, 64, generator=generator),
        "clip_g": torch.randn(n, 128, generator=generator),
    }


@pytest.fixture
def ours(sdxl):
    pipe, _ = sdxl("base")
    return Pipeline(replace(pipe.components, tokenizers=dict(pipe.components.tokenizers)))


def load_into_diffusers(pipe, path, word: str) -> None:
    from safetensors.torch import load_file

    state = load_file(path)
    pipe.load_textual_inversion(
        state["clip_l"], token=word, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token=word, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )


def test_sdxl_embedding_matches_diffusers(ours, diffusers_sdxl, tmp_path, n=2):
    path = tmp_path / "emb.safetensors"
    save_file(parts(n), path)
    embedding = ours.load_embedding(path, token=WORD)
    assert {role: v.shape[1] for role, v in embedding.vectors.items()} == {
        "text_encoder": 64,
        "text_encoder_2": 128,
    }
    pipe = diffusers_sdxl("base", "StableDiffusionXLPipeline")
    load_into_diffusers(pipe, path, WORD)
    prompt, negative = "a house in the style of my-style", "my-style, blurry"
    for role, tokenizer in (("text_encoder", pipe.tokenizer), ("text_encoder_2", pipe.tokenizer_2)):
        text = pipe.maybe_convert_prompt(prompt, tokenizer)
        expected = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        ours_tokenizer = ours.components.tokenizers[role]
        assert frame(ours_tokenizer, prompt_chunks(ours_tokenizer, prompt)[0])[0] == expected
    with torch.no_grad():
        context, uncond, pooled, uncond_pooled = pipe.encode_prompt(
            prompt, negative_prompt=negative, device="cpu", do_classifier_free_guidance=True
        )
    from latentdiffusion.families.base import ConditioningRequest

    cond, negative_cond = ours.family.encode(
        ours.components, [prompt], [negative], ConditioningRequest(64, 64)
    )
    torch.testing.assert_close(cond["context"], context, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(negative_cond["context"], uncond, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond["y"][:, : pooled.shape[1]], pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(negative_cond["y"][:, : pooled.shape[1]], uncond_pooled, rtol=1e-5, atol=1e-5)


def test_sdxl_needs_both_parts_of_their_widths(ours, tmp_path):
    one = tmp_path / "sd15.safetensors"
    save_file({"emb_params": torch.randn(2, 64)}, one)
    with pytest.raises(UserError, match=r"text_encoder \(64\) only.*text_encoder_2 \(128\)"):
        ours.load_embedding(one)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, wrong)
    with pytest.raises(UserError, match=r"1280 wide.*64 \(text_encoder\) or 128 \(text_encoder_2\)"):
        ours.load_embedding(wrong)
