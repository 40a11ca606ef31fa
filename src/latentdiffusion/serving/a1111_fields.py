"""The web UI's txt2img / img2img fields beyond the core ones (``schemas``): subseeds, the hires fix,
``override_settings``, and the fields that ask for something this server does not do, which are refused
(422 naming the field) when they ask for it rather than ignored: ``styles``, ``restore_faces``,
``tiling``, ``script_name``, ``seed_resize_from_h/w``, and an ``hr_checkpoint_name`` other than the
model in memory.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, FiniteFloat

from latentdiffusion.serving.schemas import Img2ImgRequest, Txt2ImgRequest
from latentdiffusion.serving.settings import MAX_SEED, FieldError

SAME_CHECKPOINT = ("", "Use same checkpoint")


class WebUIFields(BaseModel):
    subseed: int = Field(-1, ge=-1, le=MAX_SEED, description="variation seed (-1: random)")
    subseed_strength: FiniteFloat = Field(0, ge=0, le=1, description="0: no variation")
    seed_resize_from_h: int = Field(-1, description="not supported: <= 0")
    seed_resize_from_w: int = Field(-1, description="not supported: <= 0")
    enable_hr: bool = False
    hr_scale: FiniteFloat = Field(2.0, gt=0, le=8)
    hr_upscaler: str | None = Field(
        None, description="GET /upscalers or /latent-upscale-modes; unset: Latent"
    )
    hr_second_pass_steps: int = Field(0, ge=0, description="0: as steps")
    hr_resize_x: int = Field(0, ge=0)
    hr_resize_y: int = Field(0, ge=0)
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list)
    override_settings: dict[str, Any] = Field(default_factory=dict)
    override_settings_restore_afterwards: bool = True
    restore_faces: bool | None = None
    tiling: bool | None = None
    script_name: str | None = None


class Txt2Img(WebUIFields, Txt2ImgRequest):
    """``POST /sdapi/v1/txt2img``."""

    denoising_strength: FiniteFloat | None = Field(None, ge=0, le=1, description="hires fix; unset: 0.7")


class Img2Img(WebUIFields, Img2ImgRequest):
    """``POST /sdapi/v1/img2img``."""

    resize_mode: int = Field(0, ge=0, le=3, description="0 just resize (the others are refused)")
    initial_noise_multiplier: FiniteFloat = Field(1.0, description="1 only")
    image_cfg_scale: FiniteFloat | None = Field(None, description="instruct-pix2pix only: ignored")

    def refuse_unsupported_edits(self) -> None:
        if self.resize_mode != 0:
            raise FieldError("resize_mode", "only 0 (just resize to width x height) is supported")
        if self.initial_noise_multiplier != 1:
            raise FieldError("initial_noise_multiplier", "only 1 is supported")


def refuse_unsupported(body: WebUIFields, current_model: tuple[str, ...]) -> None:
    """One 422 for the first field that asks for what is not done here (``current_model``: the names
    of the model in memory, which ``hr_checkpoint_name`` may give)."""
    if body.styles:
        raise FieldError(
            "styles", "no prompt styles are defined on this server (GET /sdapi/v1/prompt-styles)"
        )
    if body.restore_faces:
        raise FieldError("restore_faces", "face restoration is not available here")
    if body.tiling:
        raise FieldError("tiling", "tileable images are not supported")
    if body.script_name:
        raise FieldError("script_name", "the web UI's scripts are not run here (GET /sdapi/v1/scripts)")
    for field in ("seed_resize_from_h", "seed_resize_from_w"):
        if getattr(body, field) > 0:
            raise FieldError(field, "resizing the seed is not supported; send -1 or 0")
    name = body.hr_checkpoint_name
    if body.enable_hr and name not in (None, *SAME_CHECKPOINT) and name not in current_model:
        raise FieldError(
            "hr_checkpoint_name", "the hires pass uses the model in memory: send 'Use same checkpoint'"
        )
