"""The OpenVINO backend on the tiny model: parity with the PyTorch path, the disk cache, the cache key,
DeepCache on the backend, and the refusals. Three conversions for the whole file (about 20 s each on one
thread: the plain U-Net, and DeepCache's full and shallow calls); everything else imports the cached blob
or needs no conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.errors import UserError

openvino = pytest.importorskip(
    "openvino", reason="the OpenVINO backend needs pip install 'latentdiffusion[openvino]'"
)

from latentdiffusion.backends.openvino import (  # noqa: E402 (after the skip)
    OpenVINORuntime,
    network_inputs,
    signature_of,
    weights_digest,
)

PROMPT = "a red circle on a blue background"
STEPS = 3
# Largest 8-bit difference allowed between the OpenVINO fp32 image and the PyTorch fp32 one (measured: 0;
# OpenVINO's f32 kernels may sum in another order, which moves a pixel by a level at most).
IMAGE_TOLERANCE = 2


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino-cache")


def openvino_pipe(cache, **options):
    pipe = ld.load("preset:tiny", backend="openvino", **options)
    pipe.backend.cache_dir = cache
    return pipe


@pytest.fixture(scope="module")
def converted(cache):
    """A first OpenVINO pipeline and its image: the one conversion of this file."""
    pipe = openvino_pipe(cache)
    return pipe, pipe.generate(PROMPT, steps=STEPS, seed=3)[0]


def test_openvino_images_match_pytorch_within_tolerance(converted):
    pipe, image = converted
    reference = ld.load("preset:tiny").generate(PROMPT, steps=STEPS, seed=3)[0]
    assert [event.how for event in pipe.backend.events] == ["converted"]
    difference = np.abs(pixels(image) - pixels(reference))
    assert difference.max() <= IMAGE_TOLERANCE
    assert image.info["parameters"] == reference.info["parameters"]


def test_a_second_load_imports_the_cached_model_without_converting(converted, cache):
    _, image = converted
    assert len(list(cache.glob("*.blob"))) == 1
    again = openvino_pipe(cache)
    second = again.generate(PROMPT, steps=STEPS, seed=3)[0]
    assert [event.how for event in again.backend.events] == ["cached"]
    assert again.backend.conversions == 0
    assert np.array_equal(pixels(second), pixels(image))


def test_the_cache_key_follows_weights_lora_shape_precision_and_isa_cap(converted, lora_file, monkeypatch):
    pipe, _ = converted
    runtime, unet = pipe.backend, pipe.unet
    inputs = network_inputs(torch.zeros(2, 4, 32, 32), torch.tensor(500.0), torch.zeros(2, 77, 32), {})
    signature = signature_of(inputs)
    digest = runtime.weights_digest(unet)
    key = runtime.cache_key(digest, signature)
    assert runtime.cache_key(digest, signature) == key  # stable
    larger = signature_of({**inputs, "x": torch.zeros(2, 4, 40, 32)})
    assert runtime.cache_key(digest, larger) != key
    bf16 = OpenVINORuntime("bf16", cache_dir=runtime.cache_dir)
    assert bf16.cache_key(digest, signature) != key
    monkeypatch.setenv("OV_CPU_MAX_ISA", "AVX2")  # kernels compiled for a capped instruction set
    assert runtime.cache_key(digest, signature) != key
    monkeypatch.delenv("OV_CPU_MAX_ISA")

    pipe.load_lora(lora_file, 0.5)  # merged in place: noticed by the version counters
    merged = runtime.weights_digest(unet)
    assert merged != digest and merged == weights_digest(unet)
    assert not runtime.compiled  # the models of the old weights are dropped
    assert runtime.cache_key(merged, signature) != key
    pipe.load_lora(lora_file, -0.5)
    assert runtime.weights_digest(unet) != merged


def test_deepcache_runs_on_openvino_as_on_torch(cache):
    """DeepCache on the backend: a full-call graph that also returns the cached features, a shallow-call
    graph that takes them; the image equals the torch DeepCache image within the backend's tolerance."""
    pipe = openvino_pipe(cache)
    options = dict(steps=5, seed=3, cache_interval=3)
    image = pipe.generate(PROMPT, **options)[0]
    reference = ld.load("preset:tiny").generate(PROMPT, **options)[0]
    assert np.abs(pixels(image) - pixels(reference)).max() <= IMAGE_TOLERANCE
    uncached = ld.load("preset:tiny").generate(PROMPT, steps=5, seed=3)[0]
    assert np.abs(pixels(reference) - pixels(uncached)).max() > IMAGE_TOLERANCE  # the cache shows
    modes = sorted(mode for _, mode in pipe.backend.compiled)
    assert modes == [("deepcache-full", 0), ("deepcache-shallow", 0)]
    assert image.info["parameters"] == reference.info["parameters"]
    runtime = pipe.backend
    inputs = network_inputs(torch.zeros(2, 4, 32, 32), torch.tensor(500.0), torch.zeros(2, 77, 32), {})
    digest, signature = runtime.weights_digest(pipe.unet), signature_of(inputs)
    keys = {runtime.cache_key(digest, signature, mode) for mode in (None, *modes, ("deepcache-full", 1))}
    assert len(keys) == 4


def test_controlnet_and_motion_hooks_are_refused_with_a_message(converted):
    pipe, _ = converted
    with pytest.raises(UserError, match=r"token merging.*OpenVINO backend"):
        pipe.generate(PROMPT, steps=4, seed=3, token_merging=0.5)
    unet = pipe.served().unet
    x, context = torch.zeros(2, 4, 32, 32), torch.zeros(2, 77, 32)
    with pytest.raises(UserError, match="ControlNet"):
        unet(x, torch.tensor([1.0, 1.0]), context, mid_residual=torch.zeros(2, 64, 8, 8))


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A LoRA for the tiny U-Net's attention layers with random up-projections (so that it changes it)."""
    from latentdiffusion.checkpoints.lora_keys import save_lora
    from latentdiffusion.components import build_components
    from latentdiffusion.config import TINY
    from latentdiffusion.models.lora import inject_lora, lora_modules, lora_state_dict

    unet = build_components(TINY, seed=0).unet
    inject_lora({"unet": unet}, ("attention",), rank=2)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for module in lora_modules(unet).values():
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=generator))
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    save_lora(path, {"unet": lora_state_dict(unet)}, TINY)
    return path


def test_tracing_uses_the_float32_network_without_packing_and_leaves_the_pipeline_as_it_was():
    from latentdiffusion.backends.openvino import _float32_twin
    from latentdiffusion.models.layers import set_prepacking

    unet = ld.load("preset:tiny").unet
    set_prepacking(unet, True)  # as precision="fp32-fast" leaves it
    with _float32_twin(unet) as plain:
        assert plain is unet and not any(getattr(m, "prepack", False) for m in plain.modules())
    assert any(getattr(m, "prepack", False) for m in unet.modules())

    unet.to(torch.bfloat16)  # precision="bf16": traced from a float32 copy
    with _float32_twin(unet) as plain:
        assert plain is not unet and {p.dtype for p in plain.parameters()} == {torch.float32}
    assert next(unet.parameters()).dtype == torch.bfloat16


def test_under_auto_calls_openvino_cannot_take_run_on_torch(cache):
    from latentdiffusion.backends.openvino import OpenVINORuntime

    pipe = ld.load("preset:tiny")
    reference = pipe.generate(PROMPT, steps=4, seed=3, token_merging=0.5)[0]
    pipe.backend = OpenVINORuntime("fp32", cache_dir=cache, strict=False)  # as backend="auto" makes it
    image = pipe.generate(PROMPT, steps=4, seed=3, token_merging=0.5)[0]  # token merging: all on torch
    assert pipe.backend.events == []
    assert np.array_equal(pixels(image), pixels(reference))
