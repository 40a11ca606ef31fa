"""latentdiffusion: latent diffusion (Stable Diffusion) in readable, fast PyTorch.

Heavy modules (torch, the networks) are imported on first use so that ``import latentdiffusion``
and ``ldm --help`` stay fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from latentdiffusion.diffusion.guidance import SkipLayerGuidance as SkipLayerGuidance
    from latentdiffusion.pipelines.control import Control as Control
    from latentdiffusion.pipelines.pipeline import Pipeline


def load(source: str, **options: Any) -> Pipeline:
    """Load a model: "default", a preset name, a single-file checkpoint, or a model folder.

    Options: ``device``, ``dtype``, ``prediction_type``, ``loras=[(path, strength), ...]`` (LoRA files
    merged into the weights), ``precision``: "fp32", "bf16" or "auto" (bf16 with packed weights on a CPU
    with native bfloat16, fp32 elsewhere; the fast choice, and what ``ldm`` uses by default); unset,
    the weights keep the dtype they were loaded in (float32 unless ``dtype`` says otherwise);
    ``tiny_vae``: a tiny autoencoder (TAESD file or diffusers AutoencoderTiny folder) that decodes, encodes
    and previews in place of the model's own (docs/formats.md); ``backend``: "torch" (the default),
    "openvino" (the U-Net converted and run by OpenVINO, ``pip install 'latentdiffusion[openvino]'``) or
    "auto" (see ``latentdiffusion.backends``).
    """
    from latentdiffusion.pipelines.loading import load_pipeline

    return load_pipeline(source, **options)


def merge(
    a: str | Path,
    b: str | Path,
    c: str | Path | None = None,
    *,
    method: str = "weighted-sum",
    alpha: float = 0.5,
    block_weights: str | Sequence[float] | None = None,
    output: str | Path,
    **options: Any,
) -> Path:
    """Merge single-file checkpoints: weighted-sum (1 - alpha) A + alpha B, or add-difference
    A + alpha (B - C), optionally with a ratio per U-Net block (IN../M00/OUT.., BASE first optional).
    Options: ``dtype`` ("fp16", "fp32", "bf16"; default: A's), ``keep_text_encoder``, ``keep_vae``.
    Returns the output path (see ``checkpoints.merge``)."""
    from latentdiffusion.checkpoints.merge import merge as merge_checkpoints

    return merge_checkpoints(
        a, b, c, method=method, alpha=alpha, block_weights=block_weights, output=output, **options
    )


def extract_lora(
    tuned: str | Path, base: str | Path, *, rank: int = 16, output: str | Path, **options: Any
) -> Path:
    """Write the kohya-format LoRA file that best turns ``base`` into ``tuned`` at ``rank`` (truncated
    SVD of each layer's difference). Options: ``conv_rank`` (3x3 convolutions, LoCon; 0: none; default
    ``rank``), ``clamp_quantile``, ``text_encoders`` (default True), ``dtype`` ("fp16" default, "fp32",
    "bf16"). Returns the output path (see ``checkpoints.lora_extract``)."""
    from latentdiffusion.checkpoints.lora_extract import extract_lora as extract

    return extract(tuned, base, rank=rank, output=output, **options)


def __getattr__(name: str) -> Any:
    if name == "samplers":
        import latentdiffusion.samplers as samplers

        return samplers
    if name == "Control":  # a ControlNet unit for generate/img2img/inpaint(control=[...])
        from latentdiffusion.pipelines.control import Control as Control

        return Control
    if name == "SkipLayerGuidance":  # skip-layer guidance for generate/img2img/inpaint(skip_layer_guidance=)
        from latentdiffusion.diffusion.guidance import SkipLayerGuidance as SkipLayerGuidance

        return SkipLayerGuidance
    raise AttributeError(f"module 'latentdiffusion' has no attribute {name!r}")
