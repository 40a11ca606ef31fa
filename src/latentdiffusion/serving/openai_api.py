"""OpenAI-compatible image routes, usable with the official ``openai`` client by setting its
``base_url`` to ``http://HOST:PORT/v1``:

* ``POST /v1/images/generations`` (JSON): text to image;
* ``POST /v1/images/edits`` (multipart: one image + optional mask): inpainting of the mask's
  transparent pixels, or of the image's own; without either, image to image over the whole image;
* ``POST /v1/images/variations`` (multipart: one image): image to image at the pipeline's default
  strength, with no prompt unless one is sent;
* ``GET /v1/models`` and ``/v1/models/{id}``: the models served (``ldm serve --model-dir``: all of
  them; a request's ``model`` naming one that is not in memory switches to it first).

Responses are ``{"created", "data": [{"b64_json"}], "output_format", "size"}``; generations and edits
with ``stream: true`` answer with server-sent events instead (``openai_stream``). Errors are
``{"error": {"message", "type", "param", "code"}}``. Honoured, ignored and refused fields:
docs/serving.md.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from pydantic import Field, FiniteFloat, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from latentdiffusion.pipelines.sampling import model_options
from latentdiffusion.serving.a1111_models import ModelEntry
from latentdiffusion.serving.a1111_state import resources
from latentdiffusion.serving.a1111_system import run_on_queue
from latentdiffusion.serving.codec import (
    OUTPUT_FORMATS,
    decode_image,
    fit_input,
    mask_from_alpha,
    openai_mask,
)
from latentdiffusion.serving.common import ServerState, await_job, finish_images, resolve_seed, server_state
from latentdiffusion.serving.names import resolve_sampler
from latentdiffusion.serving.openai_stream import MAX_PARTIAL_IMAGES, PartialImages, stream_response
from latentdiffusion.serving.queue import Job, JobResult
from latentdiffusion.serving.schemas import ImageGenerationRequest
from latentdiffusion.serving.settings import FieldError, check_count, check_prompt, check_size

router = APIRouter(prefix="/v1", tags=["OpenAI images API"])
MAX_FORM_FILES = 4
MAX_FORM_FIELDS = 64
IMAGE_FIELDS = ("image", "image[]")  # the client sends one image as "image", a list as "image[]"


class GenerationRequest(ImageGenerationRequest):
    """``POST /v1/images/generations``: the shared fields plus streaming and the settings that the
    stream's events echo (``quality`` and ``background`` change nothing here)."""

    stream: bool = False
    partial_images: int | None = Field(None, ge=0, le=MAX_PARTIAL_IMAGES, description="with stream")
    quality: str | None = Field(None, description="echoed in stream events; ignored")
    background: str | None = Field(None, description="echoed in stream events; ignored")


class EditRequest(GenerationRequest):
    """The text fields of ``POST /v1/images/edits`` (multipart form; image and mask are files)."""

    strength: FiniteFloat | None = Field(
        None, ge=0, le=1, description="unset: 1 with a mask, the img2img default (0.75) without"
    )


class VariationRequest(EditRequest):
    """The text fields of ``POST /v1/images/variations``: no prompt in OpenAI's API (ours may send one)."""

    prompt: str = ""


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


def strength_option(body: EditRequest) -> dict[str, float]:
    """``strength`` when sent; unset, the pipeline method's own default applies."""
    return {} if body.strength is None else {"strength": body.strength}


@router.post("/images/generations")
async def generations(body: GenerationRequest, request: Request) -> Response:
    """Create images from a prompt."""
    state = server_state(request)
    await use_requested_model(request, state, body.model)
    settings = sampling_settings(state, body)
    size = parse_size(state, body.size)
    width, height = size or (state.pipe.config.sample_size,) * 2

    def run(callback: Any) -> list[Image.Image]:
        return state.pipe.generate(**settings, width=width, height=height, callback=callback)

    return await answer(request, state, body, settings, run, "generation")


@router.post("/images/edits")
async def edits(request: Request) -> Response:
    """Repaint part of one image (multipart form: ``image``, ``mask``, ``prompt``, ...). The mask's
    transparent pixels are repainted (OpenAI); a mask without alpha is white where repainted; the
    mask must have the image's size. Without a mask, the image's own transparent pixels are
    repainted, and an opaque image is redrawn as a whole (image to image)."""
    state = server_state(request)
    async with multipart_form(request) as form:
        body = form_fields(form, EditRequest)
        sampling_settings(state, body)  # bad fields are refused before the upload is read
        image_data = await upload_bytes(single_image(form), "image", required=True)
        mask_data = await upload_bytes(form.get("mask"), "mask", required=False)
    await use_requested_model(request, state, body.model)
    settings = sampling_settings(state, body)
    size = parse_size(state, body.size)
    image, mask = await asyncio.to_thread(edit_inputs, state, image_data, mask_data, size)
    strength = strength_option(body)

    def run(callback: Any) -> list[Image.Image]:
        if mask is None:  # nothing marked: no mask settings belong in the PNG info
            return state.pipe.img2img(image, **settings, **strength, callback=callback)
        return state.pipe.inpaint(image, mask, **settings, **strength, callback=callback)

    default = 0.75 if mask is None else 1.0  # img2img's and inpaint's own defaults
    extra = {"Denoising strength": strength.get("strength", default)}
    return await answer(request, state, body, settings, run, "edit", extra=extra)


@router.post("/images/variations")
async def variations(request: Request) -> Response:
    """Variations of one image (multipart form: ``image``, ``n``, ``size``, ...): image to image at
    the pipeline's default strength (0.75), with an empty prompt unless ``prompt`` is sent."""
    state = server_state(request)
    async with multipart_form(request) as form:
        body = form_fields(form, VariationRequest)
        sampling_settings(state, body)  # bad fields are refused before the upload is read
        image_data = await upload_bytes(single_image(form), "image", required=True)
    await use_requested_model(request, state, body.model)
    settings = sampling_settings(state, body)
    size = parse_size(state, body.size)
    image = await asyncio.to_thread(variation_input, state, image_data, size)
    strength = strength_option(body)

    def run(callback: Any) -> list[Image.Image]:
        return state.pipe.img2img(image, **settings, **strength, callback=callback)

    extra = {"Denoising strength": strength.get("strength", 0.75)}
    return await answer(request, state, body, settings, run, "variation", stream=False, extra=extra)


async def answer(
    request: Request,
    state: ServerState,
    body: GenerationRequest,
    settings: dict[str, Any],
    run: Any,
    kind: str,
    stream: bool | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    """Queue the job; answer with JSON when it is done, or stream its events (``stream: true``;
    ``stream=False``: a route that never streams). ``extra``: PNG-info settings of an interrupted
    job's images (the finished ones come with the pipeline's own)."""
    output_format = body.output_format or "png"
    seeds = [settings["seed"] + i for i in range(settings["num_images"])]
    job = Job(work=run, steps=settings["steps"], description=kind)

    async def finish(result: JobResult) -> list[str]:
        if result.interrupted:
            interrupted_info(state, settings, job, result.images, extra or {})
        return await asyncio.to_thread(finish_images, state, result.images, seeds, output_format)

    if body.stream if stream is None else stream:
        partials = PartialImages(state, body.partial_images or 0)
        job.work = lambda callback: run(partials.wrap(callback))
        fields = {
            "output_format": output_format,
            "quality": body.quality or "auto",
            "background": body.background or "auto",
        }
        return stream_response(request, state, job, partials, kind, fields, finish)
    result = await await_job(request, state, job)
    return respond(body, output_format, result.images, await finish(result))


def interrupted_info(
    state: ServerState, settings: dict[str, Any], job: Job, images: list[Image.Image], extra: dict[str, Any]
) -> None:
    """PNG info for the images of an interrupted job, as the AUTOMATIC1111 routes write it: the steps it
    reached as ``Steps`` and ``Interrupted at step: reached/planned`` (the image is the estimate there)."""
    pipe = state.pipe
    options = model_options(
        pipe.config, max(job.step, 1), settings["sampler"], settings["sigmas"], settings["guidance_scale"]
    )
    extra = {**extra, "Interrupted at step": f"{job.step}/{job.steps}"}
    for i, image in enumerate(images):
        seed = settings["seed"] + i
        image.info["parameters"] = pipe.describe(
            settings["prompt"], settings["negative_prompt"], options, seed, image.width, image.height, extra
        )


def multipart_form(request: Request) -> Any:
    """The request's multipart form (``async with``), refusing other bodies: the files are required."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise FieldError("image", "is required as a file in a multipart/form-data body")
    return request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)


def form_fields(form: Any, model: type[EditRequest]) -> Any:
    """The form's text fields as ``model`` (a 422 naming bad fields, as for JSON bodies)."""
    fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    try:
        return model.model_validate(fields)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from None


def single_image(form: Any) -> Any:
    """The one ``image`` (or ``image[]``) upload. OpenAI's GPT image models take several images as
    references for a new composition, which a diffusion model conditioned on one image cannot
    honour; rather than use the first and drop the rest, several are refused."""
    uploads = [value for name in IMAGE_FIELDS for value in form.getlist(name)]
    if len(uploads) > 1:
        raise FieldError(
            "image",
            f"{len(uploads)} images were sent; this server edits one image per request "
            "(several reference images are not supported): send one image (and its mask)",
        )
    return uploads[0] if uploads else None


async def upload_bytes(value: Any, field: str, required: bool) -> bytes | None:
    if value is None and not required:
        return None
    if not isinstance(value, UploadFile):
        raise FieldError(field, "is required as a file in a multipart/form-data body")
    return await value.read()


def edit_inputs(
    state: ServerState, image_data: bytes, mask_data: bytes | None, size: tuple[int, int] | None
) -> tuple[Image.Image, Image.Image | None]:
    """The image (RGB, at ``size`` if given) and a white-where-repainted mask of the same size, or
    None when neither a mask nor the image's alpha marks anything. As OpenAI does, a mask must have
    the image's dimensions (a 422 naming both otherwise)."""
    limits = state.limits
    upload = decode_image(image_data, "image", limits)
    if mask_data is not None:
        uploaded_mask = decode_image(mask_data, "mask", limits)
        if uploaded_mask.size != upload.size:
            raise FieldError(
                "mask",
                f"must have the same dimensions as image: the mask is {size_text(uploaded_mask.size)}, "
                f"the image {size_text(upload.size)}",
            )
        mask = openai_mask(uploaded_mask)
    else:
        mask = mask_from_alpha(upload)
    image = fit_input(upload.convert("RGB"), size, limits, "image")
    if mask is not None and mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.BILINEAR)
    return image, mask


def variation_input(state: ServerState, image_data: bytes, size: tuple[int, int] | None) -> Image.Image:
    upload = decode_image(image_data, "image", state.limits)
    return fit_input(upload.convert("RGB"), size, state.limits, "image")


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def respond(
    body: ImageGenerationRequest, output_format: str, images: list[Image.Image], encoded: list[str]
) -> JSONResponse:
    """``{"created", "data": [{"b64_json"} or {"url": data URL}], "output_format", "size"}``."""
    if body.response_format == "url":
        mime = OUTPUT_FORMATS[output_format].lower()
        data = [{"url": f"data:image/{mime};base64,{b64}"} for b64 in encoded]
    else:
        data = [{"b64_json": b64} for b64 in encoded]
    size = size_text(images[0].size) if images else None
    return JSONResponse(
        {"created": int(time.time()), "data": data, "output_format": output_format, "size": size}
    )


# ---- models


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    """The models served, as OpenAI lists models (front ends list them before anything else)."""
    library = resources(server_state(request)).models
    return {"object": "list", "data": [model_object(entry) for entry in library.entries()]}


@router.get("/models/{model_id:path}")
async def model(model_id: str, request: Request) -> dict[str, Any]:
    """One model by its id (or any name ``/sdapi/v1/sd-models`` gives it); 404 for a model not served."""
    library = resources(server_state(request)).models
    try:
        return model_object(library.find(model_id))
    except FieldError:
        raise HTTPException(
            404, f"The model '{model_id}' does not exist; GET /v1/models lists the models"
        ) from None


def model_object(entry: ModelEntry) -> dict[str, Any]:
    """OpenAI's model object: ``id`` is the web UI's ``model_name``; ``created`` the file's (or
    folder's) time, 0 for a model that is not a file."""
    try:
        created = int(os.path.getmtime(entry.path)) if entry.path is not None else 0
    except OSError:
        created = 0
    return {"id": entry.model_name, "object": "model", "created": created, "owned_by": "latentdiffusion"}


async def use_requested_model(request: Request, state: ServerState, name: str | None) -> None:
    """A request's ``model`` that names a served model other than the one in memory switches to it
    first, under the queue, as ``POST /sdapi/v1/options`` does; names of no model served here (OpenAI's
    own, such as ``gpt-image-1``, which clients send by default) use the model in memory."""
    if not name:
        return
    library = resources(state).models
    try:
        entry = library.find(name)
    except FieldError:
        return
    if entry == library.current and library.loaded:
        return
    if library.loader is None:
        raise FieldError("model", "this server holds one model: start it with --model-dir to switch")
    await run_on_queue(request, state, lambda: library.load(state, entry), "load model")
