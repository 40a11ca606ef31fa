"""The bf16 fast path against the fp32 reference, the 'auto' rule, channels_last and packed weights."""

from __future__ import annotations

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.config import TINY
from latentdiffusion.errors import UserError
from latentdiffusion.models.layers import Conv2d, Linear, set_prepacking
from latentdiffusion.pipelines import precision
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.precision import apply_precision, precision_of, resolve_precision

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")


def unet_inputs(seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 7, TINY.unet.context_dim, generator=g)
    return x.to(dtype), torch.tensor([981.0, 20.0]), context.to(dtype)


@torch.inference_mode()
def test_bf16_unet_is_close_to_fp32(make_components) -> None:
    reference, fast = make_components(), apply_precision(make_components(), "bf16")
    expected = reference.unet(*unet_inputs())
    actual = fast.unet(*unet_inputs(dtype=torch.bfloat16))
    assert actual.dtype == torch.bfloat16
    error = (actual.float() - expected).abs()
    # bfloat16 keeps 8 mantissa bits (relative rounding 2**-9 per operation); through ~30 layers the
    # measured error is ~1% of the output's spread on average and ~7% at worst
    assert error.mean() < 0.03 * expected.std()
    assert error.max() < 0.15 * expected.std()


def test_bf16_generation_is_close_to_fp32(make_components, psnr) -> None:
    reference = Pipeline(make_components())
    fast = Pipeline(apply_precision(make_components(), "bf16"))
    settings = {"steps": 4, "seed": 3, "width": 32, "height": 32}
    assert (
        psnr(fast.generate("a red circle", **settings)[0], reference.generate("a red circle", **settings)[0])
        > 40
    )


def test_fast_path_keeps_sensitive_parts_in_fp32(make_components) -> None:
    components = apply_precision(make_components(), "bf16")
    assert components.unet.conv_in.weight.dtype == torch.bfloat16
    assert components.autoencoder.decoder.conv_out.weight.dtype == torch.bfloat16
    assert components.unet.time_embedding.linear_1.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in components.text_encoder.parameters())
    assert components.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert components.unet.conv_in.prepack and components.autoencoder.decoder.conv_in.prepack
    assert precision_of(components) == "bf16"
    back = apply_precision(components, "fp32")
    assert precision_of(back) == "fp32" and not back.unet.conv_in.prepack


@pytest.mark.parametrize(("has_bf16", "device", "expected"), [
    (True, "cpu", "bf16"),
    (False, "cpu", "fp32-fast"),  # a CPU without bfloat16: float32 on packed weights
    (True, "meta", "fp32"),  # not a CPU: auto never picks bf16 there
    (True, None, "bf16"),
])  # fmt: skip
def test_auto_precision_rule(monkeypatch, has_bf16, device, expected) -> None:
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: has_bf16)
    assert resolve_precision("auto", device) == expected
    assert resolve_precision("fp32", device) == "fp32"
    assert resolve_precision("bf16", device) == "bf16"
    assert resolve_precision("fp32-fast", device) == "fp32-fast"


def test_cpu_flags_decide_bf16(monkeypatch) -> None:
    detect = precision.cpu_has_bf16.__wrapped__  # the uncached function
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"fpu", "avx512f", "avx512_bf16"})
    assert detect()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"fpu", "amx_bf16", "amx_tile"})
    assert detect()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"fpu", "avx2", "avx512f"})
    assert not detect()
    monkeypatch.setattr(precision, "_cpuinfo_flags", lambda: {"fpu", "avx512_bf16"})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # oneDNN capped below bf16: it would be emulated
    assert not detect()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert detect()


def test_unknown_precision_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown precision 'fp16'"):
        resolve_precision("fp16")
    with pytest.raises(UserError, match="either a precision or a dtype"):
        ld.load("preset:tiny", precision="bf16", dtype=torch.float16)


def test_load_with_precision() -> None:
    assert precision_of(ld.load("preset:tiny").components) == "fp32"  # unset: as loaded
    assert precision_of(ld.load("preset:tiny", precision="fp32").components) == "fp32"
    assert precision_of(ld.load("preset:tiny", precision="bf16").components) == "bf16"


@torch.inference_mode()
def test_channels_last_does_not_change_results(make_components) -> None:
    components = make_components()
    expected = components.unet(*unet_inputs())
    components.unet.to(memory_format=torch.channels_last)
    torch.testing.assert_close(components.unet(*unet_inputs()), expected, atol=1e-5, rtol=1e-5)


@needs_mkldnn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_packed_weights_give_the_same_output(make_components, dtype) -> None:
    components = make_components()
    components.unet.to(dtype)
    expected = components.unet(*unet_inputs(dtype=dtype))
    set_prepacking(components.unet, True)
    actual = components.unet(*unet_inputs(dtype=dtype))
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2  # bf16: another summation order, rounded
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert components.unet.conv_in._packed_weight is not None


@needs_mkldnn
def test_packed_layers_follow_weight_changes_and_train_unpacked() -> None:
    torch.manual_seed(0)
    conv, linear = Conv2d(8, 8, 3, padding=1), Linear(8, 8)
    set_prepacking(conv, True)
    set_prepacking(linear, True)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        conv(x)
        conv.weight.mul_(2)  # an in-place change bumps the version: the packed copy is remade
        expected = torch.nn.functional.conv2d(x, conv.weight, conv.bias, padding=1)
        torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
    conv(x).sum().backward()  # with gradients the plain path runs
    assert conv.weight.grad is not None
    tokens = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    linear.to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(
            linear(tokens), torch.nn.functional.linear(tokens, linear.weight, linear.bias)
        )
    set_prepacking(conv, False)
    assert conv._packed_weight is None


def test_bf16_load_keeps_no_view_of_the_weight_file(tmp_path, make_components) -> None:
    from latentdiffusion.pipelines.precision import FilePages

    Pipeline(make_components()).save(tmp_path / "model")
    loaded = ld.load(str(tmp_path / "model"))
    original = loaded.unet.time_embedding.linear_1.weight.clone()
    networks = (loaded.unet, loaded.vae, loaded.text_encoder)
    assert FilePages(*networks).ranges  # float32 weights are views of the memory-mapped file
    apply_precision(loaded.components, "bf16")
    assert not FilePages(*networks).ranges  # every network now owns its memory: the mapping is gone
    assert torch.equal(loaded.unet.time_embedding.linear_1.weight, original)  # float32, never rounded
    FilePages(*networks).release()  # nothing to release: a no-op
