"""SD3 in little memory (``pipelines.precision``): 16-bit stored weights upcast layer by layer under fp32
(exactly the float32 forward of the same rounded weights), T5's file pages handed back as it runs (nothing
of it resident after encoding, the same images every time), and which parts each precision converts."""

from __future__ import annotations

import os
import struct
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.components import build_components
from latentdiffusion.models.mmdit import MMDiT
from latentdiffusion.models.t5 import T5Encoder
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.precision import (
    FLOAT32_PARTS,
    UpcastEmbedding,
    UpcastLinear,
    upcast_per_layer,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "families"))
from sd3_fixtures import T5, TINY_SD35

STORAGE = [torch.bfloat16, torch.float16]
T5_ROLE = "text_encoder_3"
CLIP_ROLES = ("text_encoder", "text_encoder_2")
# T5 with feed-forward weights of 96 pages each: the kernel's fault-around (mapping up to 16 cached pages
# beside each page fault) leaves a few neighbouring pages mapped, a small share of these
TINY = replace(TINY_SD35, text_encoder_3=replace(T5, intermediate_size=2048))


def randomised(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and buffer N(0, 0.1) (zero-initialised layers would hide a wrong upcast)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return module.eval()


def stored_and_reference(module: torch.nn.Module, dtype: torch.dtype) -> tuple[torch.nn.Module, ...]:
    """(weights stored in ``dtype`` and upcast per layer, float32 copy of the same rounded weights)."""
    stored = module.to(dtype)
    reference = {k: v.float() for k, v in stored.state_dict().items()}
    rebuilt = type(module)(module.config)
    rebuilt.load_state_dict(reference)
    return upcast_per_layer(stored), rebuilt.eval()


@pytest.mark.parametrize("dtype", STORAGE)
@torch.inference_mode()
def test_upcast_t5_equals_float32_t5_of_the_rounded_weights(dtype):
    stored, reference = stored_and_reference(randomised(T5Encoder(T5)), dtype)
    ids = torch.randint(0, T5.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    out = stored(ids)
    assert out.dtype == torch.float32
    assert torch.equal(out, reference(ids))
    # the big weights stayed in their storage dtype; the norms became float32
    assert isinstance(stored.layers[0].feed_forward.gate_proj, UpcastLinear)
    assert stored.layers[0].feed_forward.gate_proj.weight.dtype == dtype
    assert (
        isinstance(stored.token_embedding, UpcastEmbedding) and stored.token_embedding.weight.dtype == dtype
    )
    assert stored.final_layer_norm.weight.dtype == torch.float32
    assert stored.state_dict().keys() == reference.state_dict().keys()


@pytest.mark.parametrize("dtype", STORAGE)
@torch.inference_mode()
def test_upcast_mmdit_equals_float32_mmdit_of_the_rounded_weights(dtype):
    config = TINY_SD35.transformer
    stored, reference = stored_and_reference(randomised(MMDiT(config)), dtype)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    context = torch.randn(2, 5, config.context_dim, generator=generator)
    y = torch.randn(2, config.pooled_dim, generator=generator)
    t = torch.tensor([500.0, 20.0])
    assert torch.equal(stored(x, t, context, y), reference(x, t, context, y))
    assert stored.patch_embed.weight.dtype == dtype and stored.context_embed.weight.dtype == dtype
    assert stored.time_embed.linear_1.weight.dtype == torch.float32


def write_tiny_sd35(path: Path) -> Path:
    """A tiny SD3.5 single file with every weight random, stored in bfloat16 (as released files)."""
    components = build_components(TINY, seed=0)
    for module in components.modules.values():
        randomised(module)
    Pipeline(components).to(dtype=torch.bfloat16).save(path, format="single-file")
    return path


def resident_pages(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """(present, total) over the pages lying wholly inside ``tensors``, from /proc/self/pagemap (bit 63:
    the page is mapped in this process)."""
    page = os.sysconf("SC_PAGE_SIZE")
    present = total = 0
    with open("/proc/self/pagemap", "rb") as f:
        for tensor in tensors:
            begin, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
            first, last = -(-begin // page), end // page
            for number in range(first, last):
                f.seek(number * 8)
                (entry,) = struct.unpack("<Q", f.read(8))
                present += entry >> 63
                total += 1
    return present, total


def touch(tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        tensor.float().sum()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    return write_tiny_sd35(tmp_path_factory.mktemp("sd35") / "tiny-sd35.safetensors")


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs Linux's /proc/self/pagemap")
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_t5_holds_no_pages_after_encoding_and_images_repeat(tiny_file, precision):
    pipe = ld.load(tiny_file, precision=precision)
    t5_weights = [p for p in pipe.components.modules[T5_ROLE].parameters() if p.dtype == torch.bfloat16]
    assert t5_weights, "T5's weights should stay the file's bfloat16 views"
    touch(t5_weights)
    present, total = resident_pages(t5_weights)
    assert total > 0 and present == total
    options = {"width": 32, "height": 32, "steps": 2, "seed": 3, "guidance_scale": 4.0}
    first = np.asarray(pipe.generate("a red square", negative_prompt="blue", **options)[0])
    assert resident_pages(t5_weights)[0] < total / 20
    second = np.asarray(pipe.generate("a red square", negative_prompt="blue", **options)[0])
    assert resident_pages(t5_weights)[0] < total / 20
    assert np.array_equal(first, second) and first.std() > 0


def test_fp32_matches_a_float32_load_of_the_same_file(tiny_file):
    """fp32 (T5 upcast per layer, pages handed back) draws the image a plain float32 load draws."""
    options = {"width": 32, "height": 32, "steps": 2, "seed": 5, "guidance_scale": 4.0}
    fast = ld.load(tiny_file, precision="fp32").generate("a red square", **options)[0]
    plain = ld.load(tiny_file).generate("a red square", **options)[0]
    assert np.array_equal(np.asarray(fast), np.asarray(plain))


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_which_parts_each_precision_converts(tiny_file, precision):
    modules = ld.load(tiny_file, precision=precision).components.modules
    for role in CLIP_ROLES:
        assert {p.dtype for p in modules[role].parameters()} == {torch.float32}
    network = modules["transformer"]
    for name, child in network.named_children():
        dtypes = {p.dtype for p in child.parameters()}
        wanted = torch.bfloat16 if precision == "bf16" and name not in FLOAT32_PARTS else torch.float32
        assert dtypes == {wanted}, name
    assert network.pos_embed.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    t5 = modules[T5_ROLE]
    assert t5.layers[0].attention.q_proj.weight.dtype == torch.bfloat16  # 16-bit storage either way
    norm = torch.bfloat16 if precision == "bf16" else torch.float32
    assert t5.final_layer_norm.weight.dtype == norm


def test_weights_in_memory_get_no_page_out_hooks():
    """Only file-backed weights are handed back: a T5 built in memory keeps everything and gets no hooks."""
    from latentdiffusion.pipelines.precision import page_out_after_use

    t5 = page_out_after_use(T5Encoder(T5))
    assert not any(layer._forward_hooks for layer in t5.modules())
