"""Where the denoising network runs: ``backend="torch" | "openvino" | "auto"``.

"torch" is the plain path (the networks as loaded, under their ``precision``). "openvino" runs the U-Net
through OpenVINO (``backends.openvino``): converted with ``ov.convert_model`` for each input shape a request
needs, compiled for the CPU with the loading precision as its inference-precision hint, and cached on disk.
"auto" picks OpenVINO only for the configurations where it was measured faster (``auto_backend``;
docs/benchmarks.md, "OpenVINO"), and otherwise torch.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING

import torch

from latentdiffusion.errors import UserError

if TYPE_CHECKING:
    from latentdiffusion.pipelines.pipeline import Pipeline

BACKENDS = ("torch", "openvino", "auto")
EXTRA = "pip install 'latentdiffusion[openvino]'"


def openvino_available() -> bool:
    return find_spec("openvino") is not None


def auto_backend(precision: str, device: torch.device) -> str:
    """The backend ``"auto"`` stands for: OpenVINO where docs/benchmarks.md measured it faster than our
    own path at the same precision, which on the machines measured is nowhere, so torch."""
    return "torch"


def attach_backend(pipe: Pipeline, backend: str, cache_dir: str | None = None) -> None:
    """Run ``pipe``'s U-Net on ``backend`` from now on (its torch modules stay as they are: LoRA merging,
    saving and the other roles still use them)."""
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    precision = _precision_of(pipe)
    if backend == "auto":
        backend = auto_backend(precision, pipe.components.device)
    if backend == "torch":
        pipe.backend = None
        return
    if pipe.components.device.type != "cpu":
        raise UserError(
            "the OpenVINO backend runs on the CPU; load the model without a device, or use --backend torch"
        )
    from latentdiffusion.backends.openvino import OpenVINORuntime

    pipe.backend = OpenVINORuntime(precision, cache_dir=cache_dir)


def _precision_of(pipe: Pipeline) -> str:
    """The OpenVINO inference precision for ``pipe``: bf16 when its U-Net holds bfloat16 weights (the
    ``bf16`` precision), fp32 otherwise (float16 weights included: the CPU computes them in float32)."""
    return "bf16" if pipe.components.dtype == torch.bfloat16 else "fp32"


__all__ = ["BACKENDS", "attach_backend", "auto_backend", "openvino_available"]
