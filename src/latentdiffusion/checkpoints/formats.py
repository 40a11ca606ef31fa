"""Writing a model in any of the three formats: the project's own, diffusers folders and single files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from latentdiffusion.errors import UserError

if TYPE_CHECKING:  # the CLI reads FORMATS without importing torch
    import torch

    from latentdiffusion.components import Components

FORMATS = ("native", "diffusers", "single-file")


def save_components(
    components: Components,
    path: Path,
    format: str,
    *,
    dtype: torch.dtype | None = None,
    refiner: tuple[Components, float] | None = None,
) -> None:
    """Write ``components`` as ``format`` (one of FORMATS), weights cast to ``dtype`` if given.

    "native": a folder with safetensors plus our JSON config (and ``refiner``, a bundled refiner's
    components and switch); "diffusers": a diffusers folder; "single-file": a ``.safetensors`` file in
    the original layout plus its CompVis ``.yaml`` (both without the refiner).
    """
    from latentdiffusion.models.tiny_autoencoder import TinyAutoencoder

    path = Path(path)
    if isinstance(components.modules.get("autoencoder"), TinyAutoencoder):
        raise UserError(
            "this model was loaded with a tiny autoencoder (TAESD) in place of its own, which cannot be "
            "saved with it: load it without the tiny VAE to save or convert it"
        )
    if format == "native":
        from latentdiffusion.checkpoints.native import save_native

        save_native(components, path, dtype=dtype, refiner=refiner)
    elif format == "diffusers":
        from latentdiffusion.checkpoints.diffusers_folder import save_diffusers

        save_diffusers(components, path, dtype=dtype)
    elif format == "single-file":
        from latentdiffusion.checkpoints.single_file import save_single_file

        save_single_file(components, path, dtype=dtype)
    else:
        raise UserError(f"unknown save format {format!r}; use one of {', '.join(FORMATS)}")
