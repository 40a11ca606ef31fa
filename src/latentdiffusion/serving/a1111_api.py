"""AUTOMATIC1111-compatible routes under ``/sdapi/v1``: txt2img, img2img (with a mask: inpainting),
samplers, schedulers, sd-models, options, progress and interrupt, with that API's field names and
response shapes (images as base64 PNG with PNG info, ``parameters`` echoing the request, ``info`` a JSON
string). SDXL's micro-conditioning comes as extension fields with diffusers' names
(``schemas.MicroConditioningFields``). What is honoured and what is ignored: docs/serving.md.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image

from latentdiffusion import __version__
from latentdiffusion.pipelines.inpaint import is_inpainting_model
from latentdiffusion.pipelines.metadata import SAMPLER_DISPLAY_NAMES, sampler_display_name
from latentdiffusion.samplers import SAMPLERS
from latentdiffusion.serving.codec import decode_base64_image, encode_base64, fit_input
from latentdiffusion.serving.common import ServerState, await_job, finish_images, resolve_seed, server_state
from latentdiffusion.serving.controlnet_api import control_units, load_models
from latentdiffusion.serving.names import ALIASES, SCHEDULERS, resolve_sampler
from latentdiffusion.serving.queue import Job, JobResult
from latentdiffusion.serving.schemas import (
    Img2ImgRequest,
    Txt2ImgRequest,
    changed_micro_conditioning,
    echo,
)
from latentdiffusion.serving.settings import check_count, check_prompt, check_size

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 web UI API"])

# inpainting_fill: the web UI's 0 "fill" (blurred surroundings) has no counterpart; "original" is closest.
MASKED_CONTENT = {0: "original", 1: "original", 2: "noise", 3: "nothing"}


def sampling_settings(state: ServerState, body: Txt2ImgRequest) -> dict[str, Any]:
    """The request's sampling fields as ``Pipeline`` keyword arguments, checked against the limits."""
    config, limits = state.pipe.config, state.limits
    sampler, sigmas = resolve_sampler(
        body.sampler_name or body.sampler_index, body.scheduler, default=config.default_sampler
    )
    steps = body.steps or config.default_steps
    check_count("steps", steps, limits.max_steps)
    check_count("batch_size * n_iter", body.batch_size * body.n_iter, limits.max_images)
    check_prompt(limits, "prompt", body.prompt)
    check_prompt(limits, "negative_prompt", body.negative_prompt)
    cfg = config.default_guidance_scale if body.cfg_scale is None else body.cfg_scale
    return {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": steps,
        "guidance_scale": cfg,
        "sampler": sampler,
        "sigmas": sigmas or config.default_sigmas,
        "seed": resolve_seed(body.seed),
        "num_images": body.batch_size * body.n_iter,
        "eta": body.eta if sampler == "ddim" else None,
        "conditioning": body.micro_conditioning(),
    }


def new_job(body: Txt2ImgRequest, settings: dict[str, Any], work: Any, kind: str) -> Job:
    job = Job(work=work, steps=settings["steps"], description=kind)
    if body.force_task_id:
        job.id = body.force_task_id
    return job


@router.post("/txt2img")
async def txt2img(body: Txt2ImgRequest, request: Request) -> JSONResponse:
    """Text-to-image."""
    state = server_state(request)
    settings = sampling_settings(state, body)
    size = state.pipe.config.sample_size  # the model's own: 1024 for SDXL, 512 for SD 1.x
    width, height = body.width or size, body.height or size
    check_size(state.limits, state.size_multiple, width, height)
    controls = await asyncio.to_thread(control_units, state, body, settings["seed"])

    def work(callback: Any) -> list[Image.Image]:
        control = load_models(state, controls) or None
        return state.pipe.generate(**settings, width=width, height=height, control=control, callback=callback)

    result = await await_job(request, state, new_job(body, settings, work, "txt2img"))
    return await respond(state, body, settings, result, (width, height), echo(body))


@router.post("/img2img")
async def img2img(body: Img2ImgRequest, request: Request) -> JSONResponse:
    """Image-to-image (SDEdit) from ``init_images[0]``; with ``mask``, inpainting."""
    state = server_state(request)
    settings = sampling_settings(state, body)
    image, mask = await asyncio.to_thread(read_inputs, state, body)
    edit = edit_settings(body) if mask is not None else {"strength": body.denoising_strength}
    controls = await asyncio.to_thread(control_units, state, body, settings["seed"], image)

    def work(callback: Any) -> list[Image.Image]:
        edit["control"] = load_models(state, controls) or None
        if mask is None:
            return state.pipe.img2img(image, **settings, **edit, callback=callback)
        return state.pipe.inpaint(image, mask, **settings, **edit, callback=callback)

    kind = "inpaint" if mask is not None else "img2img"
    result = await await_job(request, state, new_job(body, settings, work, kind))
    dropped = () if body.include_init_images else ("init_images", "mask")
    return await respond(state, body, settings, result, image.size, echo(body, dropped))


def read_inputs(state: ServerState, body: Img2ImgRequest) -> tuple[Image.Image, Image.Image | None]:
    """Decode the first init image (resized to width x height when given) and the mask (to match)."""
    limits = state.limits
    image = decode_base64_image(body.init_images[0], "init_images", limits)
    size = None
    if body.width or body.height:
        size = (body.width or image.width, body.height or image.height)
        check_size(limits, state.size_multiple, *size)
    image = fit_input(image.convert("RGB"), size, limits, "init_images")
    if not body.mask:
        return image, None
    mask = decode_base64_image(body.mask, "mask", limits).convert("L")
    return image, mask if mask.size == image.size else mask.resize(image.size, Image.Resampling.BILINEAR)


def edit_settings(body: Img2ImgRequest) -> dict[str, Any]:
    """The web UI's inpainting fields as ``Pipeline.inpaint`` arguments."""
    return {
        "strength": body.denoising_strength,
        "mask_blur": body.mask_blur,
        "invert_mask": bool(body.inpainting_mask_invert),
        "only_masked": body.inpaint_full_res,
        "padding": body.inpaint_full_res_padding,
        "masked_content": MASKED_CONTENT[body.inpainting_fill],
    }


async def respond(
    state: ServerState,
    body: Txt2ImgRequest,
    settings: dict[str, Any],
    result: JobResult,
    size: tuple[int, int],
    parameters: dict[str, Any],
) -> JSONResponse:
    """The web UI's response: ``images``, ``parameters`` (the request) and ``info`` (a JSON string)."""
    seeds = [settings["seed"] + i for i in range(settings["num_images"])]
    encoded = await asyncio.to_thread(finish_images, state, result.images, seeds)
    info = info_fields(state, body, settings, result, size, seeds)
    images = encoded if body.send_images else []
    return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(info)})


def info_fields(
    state: ServerState,
    body: Txt2ImgRequest,
    settings: dict[str, Any],
    result: JobResult,
    size: tuple[int, int],
    seeds: list[int],
) -> dict[str, Any]:
    """The web UI's ``info`` object (its ``Processed.js()`` keys that have a meaning here)."""
    n = settings["num_images"]
    width, height = result.images[0].size if result.images else size
    return {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * n,
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * n,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": -1,
        "all_subseeds": [-1] * n,
        "subseed_strength": 0,
        "width": width,
        "height": height,
        "sampler_name": sampler_display_name(settings["sampler"], settings["sigmas"]),
        "cfg_scale": settings["guidance_scale"],
        "steps": settings["steps"],
        "batch_size": body.batch_size,
        "restore_faces": False,
        "sd_model_name": state.pipe.components.name,
        "sd_model_hash": None,
        "denoising_strength": getattr(body, "denoising_strength", None),
        "extra_generation_params": changed_micro_conditioning(settings["conditioning"]),
        "index_of_first_image": 0,
        "infotexts": [image.info.get("parameters", "") for image in result.images],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": is_inpainting_model(state.pipe.components),
        "version": f"latentdiffusion {__version__}",
        "interrupted": result.interrupted,
    }


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False, id_task: str | None = None) -> dict:
    """Progress of the running job (or of the job ``id_task``, an img2img/txt2img ``force_task_id``):
    ``progress`` 0..1, ``eta_relative`` seconds, ``state``, ``current_image`` (an approximate preview)."""
    queue = server_state(request).queue
    found = queue.position(id_task) if id_task else (None if queue.running is None else (queue.running, 0))
    job, position = found if found is not None else (None, None)
    running = job is not None and position == 0
    fraction = job.step / max(job.steps, 1) if running else 0.0
    elapsed = time.monotonic() - job.started if running and job.started is not None else 0.0
    preview = None
    if running and not skip_current_image:
        image = await asyncio.to_thread(queue.preview, job)
        preview = None if image is None else await asyncio.to_thread(encode_base64, image)
    return {
        "progress": fraction,
        "eta_relative": elapsed / fraction - elapsed if fraction > 0 else 0.0,
        "state": progress_state(job, running),
        "current_image": preview,
        "textinfo": progress_text(job, position),
        "queue": {"position": position, "waiting": queue.waiting, "capacity": queue.capacity},
    }


def progress_state(job: Job | None, running: bool) -> dict[str, Any]:
    return {
        "skipped": False,
        "interrupted": bool(job and job.interrupted),
        "stopping_generation": False,
        "job": job.description if job else "",
        "job_count": int(running),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "job_no": 0,
        "sampling_step": job.step if running else 0,
        "sampling_steps": job.steps if running else 0,
    }


def progress_text(job: Job | None, position: int | None) -> str | None:
    if job is None:
        return None
    if position:
        return f"waiting: {position - 1} job(s) ahead"
    return f"{job.description}: step {job.step}/{job.steps}"


@router.post("/interrupt")
async def interrupt(request: Request) -> dict:
    """Stop the running job after its current step; it returns the image it had reached."""
    server_state(request).queue.interrupt()
    return {}


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    """Our samplers under the web UI's names, with our names and its k-diffusion aliases."""
    return [
        {
            "name": SAMPLER_DISPLAY_NAMES.get(name, name),
            "aliases": [name, *ALIASES.get(name, ())],
            "options": {},
        }
        for name in SAMPLERS
    ]


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    """The noise-level discretisations (the web UI's 'scheduler' field)."""
    return [{"name": name, "label": name.capitalize(), "aliases": None} for name in SCHEDULERS]


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    """The one model in memory, in the web UI's shape, plus its ``family`` (``sd``, ``sdxl``,
    ``sdxl-refiner``; ``families.FAMILIES``) and default ``sample_size``."""
    state = server_state(request)
    components = state.pipe.components
    source = state.settings.model_source or components.name
    return [
        {
            "title": components.name,
            "model_name": components.name,
            "hash": None,
            "sha256": None,
            "filename": source,
            "config": None,
            "family": components.family.name,
            "sample_size": components.config.sample_size,
        }
    ]


@router.get("/options")
async def options(request: Request) -> dict[str, Any]:
    """The few web UI options that have a meaning here (read-only)."""
    return {"sd_model_checkpoint": server_state(request).pipe.components.name, "samples_format": "png"}
