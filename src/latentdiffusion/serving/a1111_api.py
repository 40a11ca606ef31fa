"""AUTOMATIC1111-compatible routes under ``/sdapi/v1``: txt2img (with the hires fix), img2img (with a
mask: inpainting), progress, interrupt and skip, samplers and schedulers, with that API's field names and
response shapes (images as base64 PNG with PNG info, ``parameters`` echoing the request, ``info`` a JSON
string). SDXL's micro-conditioning comes as extension fields with diffusers' names
(``schemas.MicroConditioningFields``). The web UI's other routes live beside this module and are
included here: models and options (``a1111_system``), LoRAs and listings (``a1111_networks``), PNG info
and upscalers (``a1111_extras``). What is honoured, ignored and refused: docs/serving.md.

Every image's PNG info is the web UI's: the prompt as sent (``<lora:...>`` tags included), ``Model
hash``, ``Clip skip``, ``Lora hashes``, ``Variation seed`` (subseeds); an interrupted image records the
steps it reached.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image

from latentdiffusion import __version__
from latentdiffusion.diffusion.noise import variation_noise
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.hires import RESAMPLERS, Hires, hires_fix
from latentdiffusion.pipelines.inpaint import is_inpainting_model
from latentdiffusion.pipelines.metadata import (
    SAMPLER_DISPLAY_NAMES,
    sampler_display_name,
    with_model_hash,
    with_settings,
)
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.sampling import model_options
from latentdiffusion.pipelines.text_to_image import latent_shape, size_multiple
from latentdiffusion.pipelines.token_merging import merging_parameters, with_token_merging
from latentdiffusion.samplers import SAMPLERS
from latentdiffusion.serving import a1111_extras, a1111_networks, a1111_system
from latentdiffusion.serving.a1111_extras import UPSCALERS, check_upscaler, upscale_to
from latentdiffusion.serving.a1111_fields import Img2Img, Txt2Img, WebUIFields, refuse_unsupported
from latentdiffusion.serving.a1111_models import (
    ModelEntry,
    ModelLibrary,
    check_clip_skip,
    short_hash,
    with_clip_skip,
)
from latentdiffusion.serving.a1111_networks import LoraUse, lora_hashes, merged, take_tags
from latentdiffusion.serving.a1111_state import resources
from latentdiffusion.serving.a1111_system import HONOURED_OPTIONS, current_options
from latentdiffusion.serving.codec import decode_base64_image, encode_base64, fit_input
from latentdiffusion.serving.common import ServerState, await_job, finish_images, resolve_seed, server_state
from latentdiffusion.serving.controlnet_api import control_units, load_models
from latentdiffusion.serving.names import ALIASES, SCHEDULERS, resolve_sampler
from latentdiffusion.serving.queue import Job, JobResult
from latentdiffusion.serving.schemas import Txt2ImgRequest, changed_micro_conditioning, echo
from latentdiffusion.serving.settings import FieldError, check_count, check_prompt, check_size

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111 web UI API"])
router.include_router(a1111_system.router)
router.include_router(a1111_networks.router)
router.include_router(a1111_extras.router)
# options that ``override_settings`` sets for one request
PER_REQUEST_OPTIONS = ("CLIP_stop_at_last_layers", "token_merging_ratio", "token_merging_ratio_img2img")

# inpainting_fill: the web UI's 0 "fill" (blurred surroundings) has no counterpart; "original" is closest.
MASKED_CONTENT = {0: "original", 1: "original", 2: "noise", 3: "nothing"}
HIRES_STRENGTH = 0.7  # the hires fix's denoising strength when the request gives none


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


@dataclass
class Plan:
    """What a web UI request asks for beyond ``sampling_settings`` (whose prompt is the one without
    ``<lora:...>`` tags): the prompt as sent, LoRAs, CLIP skip and subseeds."""

    sent_prompt: str
    loras: list[LoraUse]
    clip_skip: int
    subseeds: list[int]
    subseed_strength: float
    token_merging: float = 0.0  # override_settings' token_merging_ratio(_img2img): ToMe, 0 off
    extra: dict[str, Any] = field(default_factory=dict)  # PNG-info settings of an interrupted image
    # set on the worker when the job runs: the model that made the images (a switch may follow)
    pipe: Pipeline | None = None
    model: ModelEntry | None = None
    model_sha256: str | None = None

    def ran_on(self, pipe: Pipeline, models: ModelLibrary) -> Pipeline:
        self.pipe, self.model = pipe, models.current
        self.model_sha256 = models.sha256(models.current)
        return pipe

    @property
    def variation(self) -> bool:
        return self.subseed_strength > 0


def plan_request(
    state: ServerState, body: WebUIFields, settings: dict[str, Any], kind: str = "txt2img"
) -> Plan:
    """Check the web UI's extra fields, take the LoRA tags out of the prompt, pick the subseeds; ``kind``
    ("txt2img" or "img2img") picks the token merging setting that applies."""
    found = resources(state)
    models = found.models
    current = models.current
    refuse_unsupported(body, (models.title(current), current.name, current.model_name))
    clip_skip = overridden_clip_skip(state, models, body.override_settings)
    settings["prompt"], loras = take_tags(body.prompt, body.negative_prompt, found.loras)
    subseed = resolve_seed(body.subseed)
    subseeds = [subseed + i for i in range(settings["num_images"])]
    merging = overridden_token_merging(body.override_settings, kind)
    return Plan(body.prompt, loras, clip_skip, subseeds, float(body.subseed_strength), merging)


def overridden_token_merging(overrides: dict[str, Any], kind: str) -> float:
    """The token merging ratio of a request (the web UI's ``token_merging_ratio``; for img2img its
    ``token_merging_ratio_img2img`` where that is not 0), checked; 0: off."""
    from latentdiffusion.models.token_merging import validate_ratio

    keys = ("token_merging_ratio_img2img",) if kind == "img2img" else ()
    for key in (*keys, "token_merging_ratio"):
        value = overrides.get(key, 0)
        try:
            validate_ratio(value)
        except UserError as error:
            raise FieldError(f"override_settings.{key}", str(error)) from None
        if value:
            return float(value)
    return 0.0


def overridden_clip_skip(state: ServerState, models: ModelLibrary, overrides: dict[str, Any]) -> int:
    """``override_settings``: CLIP skip for this request; other options only at their current values."""
    now = current_options(state)
    for key, value in overrides.items():
        if key in PER_REQUEST_OPTIONS:
            continue
        if key == "sd_model_checkpoint" and value != now[key]:
            if models.find(str(value)) == models.current:
                continue
            raise FieldError(
                "override_settings.sd_model_checkpoint",
                "the model is switched for all requests with POST /sdapi/v1/options, not per request",
            )
        if key != "sd_model_checkpoint" and now.get(key, object()) != value:
            honoured = ", ".join(dict.fromkeys((*HONOURED_OPTIONS, *PER_REQUEST_OPTIONS)))
            raise FieldError(f"override_settings.{key}", f"cannot be changed here (honoured: {honoured})")
    if "CLIP_stop_at_last_layers" not in overrides:
        return models.clip_skip
    return check_clip_skip(
        state.pipe, overrides["CLIP_stop_at_last_layers"], "override_settings.CLIP_stop_at_last_layers"
    )


def served(state: ServerState, clip_skip: int) -> Pipeline:
    """The pipeline a request runs on, read on the worker when it runs (after any model switch)."""
    models = resources(state).models
    return state.pipe if clip_skip == models.clip_skip else with_clip_skip(models.base, clip_skip)


def variation_latents(pipe: Pipeline, settings: dict[str, Any], plan: Plan, width: int, height: int) -> Any:
    """Image i's starting noise moved ``subseed_strength`` towards subseed i's (the web UI's subseeds,
    ``diffusion.noise.variation_noise``), or None without a variation."""
    if not plan.variation:
        return None
    shape = latent_shape(pipe.components, 1, width, height)
    seeds = [settings["seed"] + i for i in range(settings["num_images"])]
    rows = [
        variation_noise(shape, [s], v, plan.subseed_strength)
        for s, v in zip(seeds, plan.subseeds, strict=True)
    ]
    return torch.cat(rows)


def new_job(body: Txt2ImgRequest, settings: dict[str, Any], work: Any, kind: str) -> Job:
    job = Job(work=work, steps=settings["steps"], description=kind)
    if body.force_task_id:
        job.id = body.force_task_id
    return job


@router.post("/txt2img")
async def txt2img(body: Txt2Img, request: Request) -> JSONResponse:
    """Text-to-image; with ``enable_hr``, the hires fix (``pipelines.hires``)."""
    state = server_state(request)
    settings = sampling_settings(state, body)
    plan = plan_request(state, body, settings)
    size = state.pipe.config.sample_size  # the model's own: 1024 for SDXL, 512 for SD 1.x
    width, height = body.width or size, body.height or size
    check_size(state.limits, state.size_multiple, width, height)
    hires = hires_settings(state, body, width, height) if body.enable_hr else None
    controls = await asyncio.to_thread(control_units, state, body, settings["seed"])
    if hires is not None and controls:
        raise FieldError("enable_hr", "the hires fix does not take ControlNet units yet")
    models = resources(state).models

    def work(callback: Any) -> list[Image.Image]:
        pipe = plan.ran_on(served(state, plan.clip_skip), models)
        with merged(models.base, plan.loras):
            if hires is not None:
                return run_hires(pipe, settings, plan, hires, width, height, callback)
            control = load_models(state, controls) or None
            latents = variation_latents(pipe, settings, plan, width, height)
            return pipe.generate(
                **settings,
                latents=latents,
                width=width,
                height=height,
                control=control,
                token_merging=plan.token_merging,
                callback=callback,
            )

    job = new_job(body, settings, work, "txt2img")
    result = await await_job(request, state, job)
    return await respond(state, body, settings, plan, job, result, (width, height), echo(body))


def hires_settings(state: ServerState, body: Txt2Img, width: int, height: int) -> Hires:
    """The hires fields as ``pipelines.hires.Hires``, checked (the target size within the limits)."""
    upscaler = body.hr_upscaler or "Latent"
    check_upscaler(state, upscaler, "hr_upscaler", latent=True)
    sampler = sigmas = None
    if body.hr_sampler_name:
        sampler, sigmas = resolve_sampler(body.hr_sampler_name, body.hr_scheduler, field="hr_sampler_name")
    if body.hr_second_pass_steps:
        check_count("hr_second_pass_steps", body.hr_second_pass_steps, state.limits.max_steps)
    strength = HIRES_STRENGTH if body.denoising_strength is None else body.denoising_strength
    hires = Hires(
        scale=body.hr_scale,
        resize_x=body.hr_resize_x,
        resize_y=body.hr_resize_y,
        upscaler=upscaler,
        steps=body.hr_second_pass_steps,
        strength=strength,
        sampler=sampler,
        sigmas=sigmas,
        prompt=body.hr_prompt or None,
        negative_prompt=body.hr_negative_prompt or None,
    )
    from latentdiffusion.pipelines.hires import target_size

    factor = state.pipe.components.family.latent_format(state.pipe.config).factor
    final = target_size(width, height, hires, factor).final_size(factor)
    check_size(state.limits, state.size_multiple, *final, prefix="hires ")
    return hires


def run_hires(
    pipe: Pipeline, settings: dict[str, Any], plan: Plan, hires: Hires, width: int, height: int, callback: Any
) -> list[Image.Image]:
    """The hires fix on the worker; each image's PNG info as the web UI writes it (Size: the first
    pass's, then Denoising strength, Hires upscale or resize, Hires steps, Hires upscaler)."""
    names = [name for name in UPSCALERS.names(pipe) if name not in RESAMPLERS]

    def upscale(images: list[Image.Image], w: int, h: int) -> list[Image.Image]:
        name = "Lanczos" if hires.upscaler == "None" else hires.upscaler  # the web UI's None: a plain resize
        return [upscale_to(pipe, image, name, w, h) for image in images]

    variation = (plan.subseeds, plan.subseed_strength) if plan.variation else None
    options = {k: v for k, v in settings.items() if k not in ("prompt", "negative_prompt")}
    images, first, _ = hires_fix(
        with_token_merging(pipe.served(), plan.token_merging),  # both passes
        settings["prompt"],
        settings["negative_prompt"],
        width,
        height,
        hires,
        upscale_images=upscale,
        upscaler_names=names,
        variation=variation,
        callback=callback,
        **options,
    )
    extra: dict[str, Any] = {"Denoising strength": hires.strength}
    if hires.resize_x or hires.resize_y:
        extra["Hires resize"] = f"{hires.resize_x}x{hires.resize_y}"
    else:
        extra["Hires upscale"] = int(hires.scale) if float(hires.scale).is_integer() else hires.scale
    if hires.steps:
        extra["Hires steps"] = hires.steps
    extra["Hires upscaler"] = hires.upscaler
    if hires.sampler is not None:
        extra["Hires sampler"] = sampler_display_name(hires.sampler, hires.sigmas)
    if hires.prompt is not None:
        extra["Hires prompt"] = hires.prompt
    if hires.negative_prompt is not None:
        extra["Hires negative prompt"] = hires.negative_prompt
    extra.update(merging_parameters(plan.token_merging))
    for image, p, n, s in zip(images, first.prompts, first.negative_prompts, first.seeds, strict=True):
        image.info["parameters"] = pipe.describe(p, n, first.options, s, width, height, extra)
    return images


@router.post("/img2img")
async def img2img(body: Img2Img, request: Request) -> JSONResponse:
    """Image-to-image (SDEdit) from ``init_images[0]``; with ``mask``, inpainting."""
    state = server_state(request)
    body.refuse_unsupported_edits()
    settings = sampling_settings(state, body)
    plan = plan_request(state, body, settings, "img2img")
    image, mask = await asyncio.to_thread(read_inputs, state, body)
    if mask is not None and plan.variation:
        raise FieldError("subseed_strength", "subseeds with a mask (inpainting) are not supported yet")
    edit = edit_settings(body) if mask is not None else {"strength": body.denoising_strength}
    edit["token_merging"] = plan.token_merging
    controls = await asyncio.to_thread(control_units, state, body, settings["seed"], image)
    plan.extra = {"Denoising strength": body.denoising_strength}
    models = resources(state).models

    def work(callback: Any) -> list[Image.Image]:
        pipe = plan.ran_on(served(state, plan.clip_skip), models)
        edit["control"] = load_models(state, controls) or None
        with merged(models.base, plan.loras):
            if mask is None:
                f = size_multiple(pipe.components)
                w, h = image.width // f * f, image.height // f * f
                latents = variation_latents(pipe, settings, plan, w, h)
                return pipe.img2img(image, **settings, **edit, latents=latents, callback=callback)
            return pipe.inpaint(image, mask, **settings, **edit, callback=callback)

    kind = "inpaint" if mask is not None else "img2img"
    job = new_job(body, settings, work, kind)
    result = await await_job(request, state, job)
    dropped = () if body.include_init_images else ("init_images", "mask")
    return await respond(state, body, settings, plan, job, result, image.size, echo(body, dropped))


def read_inputs(state: ServerState, body: Img2Img) -> tuple[Image.Image, Image.Image | None]:
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


def edit_settings(body: Img2Img) -> dict[str, Any]:
    """The web UI's inpainting fields as ``Pipeline.inpaint`` arguments."""
    return {
        "strength": body.denoising_strength,
        "mask_blur": body.mask_blur,
        "invert_mask": bool(body.inpainting_mask_invert),
        "only_masked": body.inpaint_full_res,
        "padding": body.inpaint_full_res_padding,
        "masked_content": MASKED_CONTENT[body.inpainting_fill],
    }


def interrupted_texts(
    pipe: Pipeline, settings: dict[str, Any], plan: Plan, job: Job, images: list[Image.Image]
) -> None:
    """PNG info for the images of an interrupted job: the steps it reached (of how many)."""
    options = model_options(
        pipe.config,
        max(job.step, 1),
        settings["sampler"],
        settings["sigmas"],
        settings["guidance_scale"],
        eta=settings["eta"],
    )
    extra = {**plan.extra, "Interrupted at step": f"{job.step}/{job.steps}"}
    for i, image in enumerate(images):
        seed = settings["seed"] + i
        image.info["parameters"] = pipe.describe(
            settings["prompt"], settings["negative_prompt"], options, seed, image.width, image.height, extra
        )


def finish_texts(state: ServerState, settings: dict[str, Any], plan: Plan, images: list[Image.Image]) -> None:
    """The web UI's PNG info: the prompt as sent, subseeds, CLIP skip, LoRA and model hashes."""
    model_hash = short_hash(plan.model_sha256)
    used = settings["prompt"]
    hashes = lora_hashes(resources(state).loras, plan.loras) if plan.loras else None
    for i, image in enumerate(images):
        text = image.info.get("parameters") or ""
        if used != plan.sent_prompt and text.startswith(used):
            text = plan.sent_prompt + text[len(used) :]
        added: dict[str, Any] = {}
        if plan.variation:
            added.update(
                {"Variation seed": plan.subseeds[i], "Variation seed strength": plan.subseed_strength}
            )
        if plan.clip_skip > 1:
            added["Clip skip"] = plan.clip_skip
        if hashes:
            added["Lora hashes"] = hashes
        image.info["parameters"] = with_model_hash(with_settings(text, added), model_hash)


async def respond(
    state: ServerState,
    body: Txt2Img | Img2Img,
    settings: dict[str, Any],
    plan: Plan,
    job: Job,
    result: JobResult,
    size: tuple[int, int],
    parameters: dict[str, Any],
) -> JSONResponse:
    """The web UI's response: ``images``, ``parameters`` (the request) and ``info`` (a JSON string)."""
    seeds = [settings["seed"] + i for i in range(settings["num_images"])]
    if result.interrupted:
        interrupted_texts(plan.pipe or state.pipe, settings, plan, job, result.images)
    finish_texts(state, settings, plan, result.images)
    encoded = await asyncio.to_thread(finish_images, state, result.images, seeds)
    info = info_fields(state, body, settings, plan, job, result, size, seeds)
    images = encoded if body.send_images else []
    return JSONResponse({"images": images, "parameters": parameters, "info": json.dumps(info)})


def info_fields(
    state: ServerState,
    body: Txt2Img | Img2Img,
    settings: dict[str, Any],
    plan: Plan,
    job: Job,
    result: JobResult,
    size: tuple[int, int],
    seeds: list[int],
) -> dict[str, Any]:
    """The web UI's ``info`` object (its ``Processed.js()`` keys that have a meaning here)."""
    n = settings["num_images"]
    width, height = result.images[0].size if result.images else size
    model = plan.model or resources(state).models.current
    return {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * n,
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * n,
        "seed": seeds[0],
        "all_seeds": seeds,
        "subseed": plan.subseeds[0],
        "all_subseeds": plan.subseeds,
        "subseed_strength": plan.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": sampler_display_name(settings["sampler"], settings["sigmas"]),
        "cfg_scale": settings["guidance_scale"],
        "steps": job.step if result.interrupted else settings["steps"],
        "batch_size": body.batch_size,
        "restore_faces": False,
        "sd_model_name": model.model_name,
        "sd_model_hash": short_hash(plan.model_sha256),
        "denoising_strength": getattr(body, "denoising_strength", None),
        "extra_generation_params": changed_micro_conditioning(settings["conditioning"]),
        "index_of_first_image": 0,
        "infotexts": [image.info.get("parameters", "") for image in result.images],
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": plan.clip_skip,
        "is_using_inpainting_conditioning": is_inpainting_model((plan.pipe or state.pipe).components),
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


@router.post("/skip")
async def skip(request: Request) -> dict:
    """The web UI's Skip: ends the running job's current batch with the image it had reached. A
    request runs as one batch here (``batch_size`` x ``n_iter`` together), so this ends the job as
    ``interrupt`` does."""
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
