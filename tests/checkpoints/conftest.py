"""Tiny random-weight Stable Diffusion pipelines built and saved by diffusers: the oracles of these tests.

Three variants, each with every parameter perturbed so that norms and biases are not at their defaults:
``sd1`` (OpenAI-CLIP text encoder, conv transformer projections, eps), ``sd2-v`` (OpenCLIP-style gelu
text encoder padded with "!", linear projections, 32-wide heads given per level, upcast attention,
v-prediction) and ``sd1-inpaint`` (9 input channels). Widths are multiples of 32 (the norm groups of
every released model) and text heads are 64 wide, as in every CLIP, so that a CompVis yaml can describe
them completely. The autoencoder has two levels (f = 2): 16x16 images have 8x8 latents.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # helpers beside the tests (mecha_keys)

from latentdiffusion.models.tokenizer import CLIPTokenizer

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")


@dataclass
class Case:
    name: str
    pipe: object  # the diffusers pipeline (the oracle)
    folder: Path  # where diffusers saved it (save_pretrained)
    prediction_type: str


def _unet(name: str):
    if name == "sd2-v":
        return diffusers.UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            attention_head_dim=(1, 2, 2),  # head counts: 32-wide heads, as SD 2 keeps 64-wide ones
            cross_attention_dim=64,
            use_linear_projection=True,
            upcast_attention=True,
        )
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=9 if name == "sd1-inpaint" else 4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=64,
    )


def _vae():
    return diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        sample_size=16,
    )


def _text_encoder(activation: str, pad_token_id: int):
    config = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        max_position_embeddings=77,
        hidden_act=activation,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=pad_token_id,
    )
    return transformers.CLIPTextModel(config)


def _scheduler(prediction_type: str):
    return diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Perturb every parameter so that norms and biases are not at their 1/0 defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return module.eval()


def build_case(name: str, root: Path) -> Case:
    sd2 = name == "sd2-v"
    pad = 0 if sd2 else 49407
    tokenizer_dir = root / f"{name}-tokenizer"
    CLIPTokenizer.from_bundled(pad_token_id=pad).save(tokenizer_dir)
    torch.manual_seed(0)
    parts = dict(
        unet=randomize_(_unet(name), 1),
        vae=randomize_(_vae(), 2),
        text_encoder=randomize_(_text_encoder("gelu" if sd2 else "quick_gelu", pad), 3),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=_scheduler("v_prediction" if sd2 else "epsilon"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    kind = (
        diffusers.StableDiffusionInpaintPipeline
        if name == "sd1-inpaint"
        else diffusers.StableDiffusionPipeline
    )
    pipe = kind(**parts)
    pipe.set_progress_bar_config(disable=True)
    folder = root / name
    pipe.save_pretrained(folder)
    return Case(name, pipe, folder, "v_prediction" if sd2 else "epsilon")


@pytest.fixture(scope="session")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("diffusers-models")
    return {name: build_case(name, root) for name in ("sd1", "sd2-v", "sd1-inpaint")}
