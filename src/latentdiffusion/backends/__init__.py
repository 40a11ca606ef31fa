"""Where the denoising network runs: ``backend="torch" | "openvino" | "auto"``.

"torch" is the plain path (the networks as loaded, under their ``precision``). "openvino" runs the U-Net
through OpenVINO (``backends.openvino``): converted with ``ov.convert_model`` for each input shape a request
needs, compiled for the CPU with the loading precision as its inference-precision hint, and cached on disk.
"auto" picks OpenVINO only for the configuration where it was measured faster (``auto_backend``;
docs/benchmarks.md, "OpenVINO"), and otherwise torch; under "auto" a call OpenVINO cannot take (ControlNet,
motion modules, token merging) runs the torch U-Net instead of being refused. DeepCache runs on OpenVINO
too (its full and shallow calls are two more graphs).
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from latentdiffusion.errors import UserError

if TYPE_CHECKING:
    from latentdiffusion.pipelines.pipeline import Pipeline

BACKENDS = ("torch", "openvino", "auto")
# Converting for a new input shape peaked at 3.4x the U-Net's float32 size in resident memory (SD 1.5 in
# bf16: 11.6 GiB for 3.4 GB of float32 weights; docs/benchmarks.md): "auto" converts only with that free.
CONVERSION_MEMORY_FACTOR = 3.5


def openvino_available() -> bool:
    return find_spec("openvino") is not None


def auto_backend(pipe: Pipeline, precision: str) -> str:
    """The backend ``"auto"`` stands for. OpenVINO was measured faster than our own path only for a bf16
    U-Net on a CPU with native bfloat16 (SD 1.5, one thread: 1.6x per guided call at 256 px); in float32
    it did not beat our fp32-fast path, with or without AVX-512 (docs/benchmarks.md, "OpenVINO"). So:
    OpenVINO for a bf16 U-Net on such a CPU when openvino is installed and the memory a conversion takes
    is available, torch otherwise."""
    from latentdiffusion.pipelines.precision import cpu_has_bf16

    components = pipe.components
    if precision != "bf16" or "unet" not in components.modules or components.device.type != "cpu":
        return "torch"
    if not (cpu_has_bf16() and openvino_available()):
        return "torch"
    float32_bytes = 4 * sum(p.numel() for p in components.unet.parameters())
    return "openvino" if available_memory() >= CONVERSION_MEMORY_FACTOR * float32_bytes else "torch"


def available_memory() -> int:
    """Bytes the kernel says are available (MemAvailable); 0 where unknown."""
    try:
        lines = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def attach_backend(pipe: Pipeline, backend: str, cache_dir: str | None = None) -> None:
    """Run ``pipe``'s U-Net on ``backend`` from now on (its torch modules stay as they are: LoRA merging,
    saving and the other roles still use them)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    precision = _precision_of(pipe)
    chosen = auto_backend(pipe, precision) if backend == "auto" else backend
    if chosen == "torch":
        pipe.backend = None
        return
    if pipe.components.device.type != "cpu":
        raise UserError(
            "the OpenVINO backend runs on the CPU; load the model without a device, or use --backend torch"
        )
    from latentdiffusion.backends.openvino import OpenVINORuntime

    pipe.backend = OpenVINORuntime(precision, cache_dir=cache_dir, strict=backend == "openvino")


def _precision_of(pipe: Pipeline) -> str:
    """The OpenVINO inference precision for ``pipe``: bf16 when its U-Net holds bfloat16 weights (the
    ``bf16`` precision), fp32 otherwise (float16 weights included: the CPU computes them in float32)."""
    return "bf16" if pipe.components.dtype == torch.bfloat16 else "fp32"


__all__ = ["BACKENDS", "attach_backend", "auto_backend", "available_memory", "openvino_available"]
