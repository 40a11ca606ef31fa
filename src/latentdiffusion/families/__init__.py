"""The model families, by the name a ``ModelConfig.family`` records (see ``families.base``)."""

from __future__ import annotations

from latentdiffusion.config import ModelConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families.base import (
    ConditioningRequest,
    Family,
    LatentFormat,
    MicroConditioning,
)
from latentdiffusion.families.sd import SD
from latentdiffusion.families.sd3 import SD3
from latentdiffusion.families.sdxl import SDXL, SDXL_REFINER

FAMILIES: dict[str, Family] = {
    SD.name: SD,
    SDXL.name: SDXL,
    SDXL_REFINER.name: SDXL_REFINER,
    SD3.name: SD3,
}


def family_of(config: ModelConfig) -> Family:
    try:
        return FAMILIES[config.family]
    except KeyError:
        known = ", ".join(FAMILIES)
        raise UserError(
            f"model {config.name!r} names an unknown family {config.family!r}; known: {known}"
        ) from None


__all__ = ["FAMILIES", "ConditioningRequest", "Family", "LatentFormat", "MicroConditioning", "family_of"]
