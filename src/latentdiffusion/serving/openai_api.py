"""OpenAI-compatible image routes: ``POST /v1/images/generations`` (JSON) and ``POST /v1/images/edits``
(multipart: image + optional mask -> inpainting), usable with the official ``openai`` client by setting
its ``base_url`` to ``http://HOST:PORT/v1``. Responses are ``{"created", "data": [{"b64_json"}]}``;
errors are ``{"error": {"message", "type", "param"}}``. Honoured and ignored fields: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from latentdiffusion.serving.codec import (
    OUTPUT_FORMATS,
    decode_image,
    fit_input,
    mask_from_alpha,
    openai_mask,
)
from latentdiffusion.serving.common import ServerState, await_job, finish_images, resolve_seed, server_state
from latentdiffusion.serving.names import resolve_sampler
from latentdiffusion.serving.queue import Job
from latentdiffusion.serving.schemas import ImageEditFields, ImageGenerationRequest
from latentdiffusion.serving.settings import FieldError, check_count, check_prompt, check_size

router = APIRouter(prefix="/v1", tags=["OpenAI images API"])
MAX_FORM_FILES = 4
MAX_FORM_FIELDS = 64


def parse_size(state: ServerState, size: str | None) -> tuple[int, int] | None:
    """``"512x768"`` -> (512, 768); None or "auto" -> None (the model's or the input's size)."""
    if size is None or size == "auto":
        return None
    width, x, height = size.lower().partition("x")
    if not (x and width.isdigit() and height.isdigit()):
        raise FieldError("size", f"expected WIDTHxHEIGHT such as 512x512 or 'auto', got {size!r}")
    check_size(state.limits, state.size_multiple, int(width), int(height), prefix="size ")
    return int(width), int(height)


def sampling_settings(state: ServerState, body: ImageGenerationRequest) -> dict[str, Any]:
    """OpenAI fields (and our extensions) as ``Pipeline`` keyword arguments, checked against the limits."""
    config, limits = state.pipe.config, state.limits
    sampler, sigmas = resolve_sampler(body.sampler, field="sampler", default=config.default_sampler)
    steps = body.steps or config.default_steps
    check_count("n", body.n or 1, limits.max_images)
    check_count("steps", steps, limits.max_steps)
    check_prompt(limits, "prompt", body.prompt)
    check_prompt(limits, "negative_prompt", body.negative_prompt or "")
    cfg = config.default_guidance_scale if body.guidance_scale is None else body.guidance_scale
    return {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or "",
        "steps": steps,
        "guidance_scale": cfg,
        "sampler": sampler,
        "sigmas": sigmas,
        "seed": resolve_seed(body.seed),
        "num_images": body.n or 1,
    }


@router.post("/images/generations")
async def generations(body: ImageGenerationRequest, request: Request) -> JSONResponse:
    """Create images from a prompt."""
    state = server_state(request)
    settings = sampling_settings(state, body)
    size = parse_size(state, body.size)
    width, height = size or (state.pipe.config.sample_size,) * 2

    def work(callback: Any) -> list[Image.Image]:
        return state.pipe.generate(**settings, width=width, height=height, callback=callback)

    result = await await_job(
        request, state, Job(work=work, steps=settings["steps"], description="generation")
    )
    return await respond(state, body, settings, result.images)


@router.post("/images/edits")
async def edits(request: Request) -> JSONResponse:
    """Repaint the masked area of an image (multipart form: ``image`` or ``image[]``, ``mask``,
    ``prompt``, ...). The mask's transparent pixels are repainted (OpenAI); a mask without alpha is
    white where repainted; without a mask, the image's own transparent pixels are."""
    state = server_state(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise FieldError("image", "is required as a file in a multipart/form-data body")
    async with request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS) as form:
        body = edit_fields(form)
        settings = sampling_settings(state, body)
        image_data = await upload_bytes(form.get("image") or form.get("image[]"), "image", required=True)
        mask_data = await upload_bytes(form.get("mask"), "mask", required=False)
    size = parse_size(state, body.size)
    image, mask = await asyncio.to_thread(edit_inputs, state, image_data, mask_data, size)

    def work(callback: Any) -> list[Image.Image]:
        return state.pipe.inpaint(image, mask, **settings, strength=body.strength, callback=callback)

    result = await await_job(request, state, Job(work=work, steps=settings["steps"], description="edit"))
    return await respond(state, body, settings, result.images)


def edit_fields(form: Any) -> ImageEditFields:
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    try:
        return ImageEditFields.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


async def upload_bytes(value: Any, field: str, required: bool) -> bytes | None:
    if value is None and not required:
        return None
    if not isinstance(value, UploadFile):
        raise FieldError(field, "is required as a file in a multipart/form-data body")
    return await value.read()


def edit_inputs(
    state: ServerState, image_data: bytes, mask_data: bytes | None, size: tuple[int, int] | None
) -> tuple[Image.Image, Image.Image]:
    """The image (RGB, at ``size`` if given) and a white-where-repainted mask of the same size."""
    limits = state.limits
    upload = decode_image(image_data, "image", limits)
    if mask_data is not None:
        mask = openai_mask(decode_image(mask_data, "mask", limits))
    else:
        mask = mask_from_alpha(upload) or Image.new("L", upload.size, 255)
    image = fit_input(upload.convert("RGB"), size, limits, "image")
    return image, mask.resize(image.size, Image.Resampling.BILINEAR) if mask.size != image.size else mask


async def respond(
    state: ServerState, body: ImageGenerationRequest, settings: dict[str, Any], images: list[Image.Image]
) -> JSONResponse:
    """``{"created", "data": [{"b64_json"} or {"url": data URL}], "output_format", "size"}``."""
    output_format = body.output_format or "png"
    seeds = [settings["seed"] + i for i in range(settings["num_images"])]
    encoded = await asyncio.to_thread(finish_images, state, images, seeds, output_format)
    if body.response_format == "url":
        mime = OUTPUT_FORMATS[output_format].lower()
        data = [{"url": f"data:image/{mime};base64,{b64}"} for b64 in encoded]
    else:
        data = [{"b64_json": b64} for b64 in encoded]
    size = f"{images[0].width}x{images[0].height}" if images else None
    return JSONResponse(
        {"created": int(time.time()), "data": data, "output_format": output_format, "size": size}
    )
