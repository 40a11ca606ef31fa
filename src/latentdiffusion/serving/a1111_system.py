"""The web UI's model, option and system routes: ``sd-models``, ``options`` (read and set),
``refresh-checkpoints``, ``unload-checkpoint``, ``reload-checkpoint``, ``cmd-flags``, ``memory``,
``sd-vae``. Settings that mean something here are honoured (``HONOURED_OPTIONS``); any other option
sent with a value other than the one ``GET /options`` reports is refused (422 naming it), never
dropped in silence.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from latentdiffusion.serving.a1111_models import ModelLibrary, check_clip_skip
from latentdiffusion.serving.a1111_state import resources
from latentdiffusion.serving.common import ServerState, await_job, server_state
from latentdiffusion.serving.queue import Job
from latentdiffusion.serving.settings import FieldError

router = APIRouter()
HONOURED_OPTIONS = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
VAE_CHOICES = ("Automatic", "None")  # the model's own autoencoder either way: there is no other


def current_options(state: ServerState) -> dict[str, Any]:
    """The web UI's options that have a meaning here, with their values now."""
    models = resources(state).models
    outputs = state.settings.output_dir
    return {
        "sd_model_checkpoint": models.title(models.current),
        "sd_checkpoint_hash": models.sha256(models.current),
        "CLIP_stop_at_last_layers": models.clip_skip,
        "token_merging_ratio": 0.0,  # set per request in override_settings (token merging, ToMe)
        "token_merging_ratio_img2img": 0.0,
        "sd_vae": "Automatic",
        "sd_checkpoints_limit": 1,
        "samples_format": "png",
        "outdir_samples": str(outputs) if outputs is not None else "",
        "eta_noise_seed_delta": 0,
        "img2img_fix_steps": False,
        "enable_pnginfo": True,
    }


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    """The options that have a meaning here (``sd_model_checkpoint`` as its title in ``sd-models``)."""
    return current_options(server_state(request))


@router.post("/options")
async def set_options(request: Request, body: dict[str, Any]) -> None:
    """Set ``sd_model_checkpoint`` (a model of ``sd-models``: loaded under the queue, the previous one
    released) and ``CLIP_stop_at_last_layers`` (CLIP skip, SD 1.x-style models). Other options are
    accepted only with the value they have. Everything is checked before anything changes, except a
    CLIP skip sent with a model switch, which is checked against the new model after the switch."""
    state = server_state(request)
    models = resources(state).models
    now = current_options(state)
    refused = [
        key
        for key, value in body.items()
        if key not in HONOURED_OPTIONS
        and not (key == "sd_vae" and value in VAE_CHOICES)
        and now.get(key, object()) != value
    ]
    if refused:
        raise FieldError(
            refused[0],
            f"cannot be set on this server: {', '.join(refused)}; the options it honours are "
            f"{', '.join(HONOURED_OPTIONS)} (others are accepted unchanged: GET /sdapi/v1/options)",
        )
    entry = models.find(str(body["sd_model_checkpoint"])) if "sd_model_checkpoint" in body else None
    switching = entry is not None and (entry != models.current or not models.loaded)
    if switching and models.loader is None:
        raise FieldError(
            "sd_model_checkpoint", "this server holds one model: start it with --model-dir to switch"
        )
    if "CLIP_stop_at_last_layers" in body and not switching:
        check_clip_skip(state.pipe, body["CLIP_stop_at_last_layers"])
    if switching:
        await run_on_queue(request, state, lambda: models.load(state, entry), "load model")
    if "CLIP_stop_at_last_layers" in body:
        clip_skip = check_clip_skip(state.pipe, body["CLIP_stop_at_last_layers"])
        await run_on_queue(request, state, lambda: set_clip_skip(state, models, clip_skip), "set CLIP skip")


def set_clip_skip(state: ServerState, models: ModelLibrary, clip_skip: int) -> None:
    if clip_skip != models.clip_skip:
        models.clip_skip = clip_skip
        models.serve(state, new_model=False)


async def run_on_queue(request: Request, state: ServerState, action: Any, description: str) -> None:
    """Run ``action`` as a job of the queue (after the jobs before it; none runs beside it)."""

    def work(callback: Any) -> list:
        action()
        return []

    await await_job(request, state, Job(work=work, steps=1, description=description))


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    """The offered models in the web UI's shape (``hash``: first 10 hex digits of ``sha256``, once
    known), plus ``family`` and ``sample_size`` for the one in memory (None for the others)."""
    state = server_state(request)
    models = resources(state).models
    answer = []
    for entry in models.entries():
        sha = models.sha256(entry)
        current = entry == models.current
        components = state.pipe.components if current else None
        answer.append(
            {
                "title": models.title(entry),
                "model_name": entry.model_name,
                "hash": sha[:10] if sha else None,
                "sha256": sha,
                "filename": str(entry.path) if entry.path is not None else entry.source or entry.name,
                "config": None,
                "family": components.family.name if components else None,
                "sample_size": components.config.sample_size if components else None,
            }
        )
    return answer


@router.post("/refresh-checkpoints")
async def refresh_checkpoints(request: Request) -> None:
    """Read the models folder (``--model-dir``) again."""
    models = resources(server_state(request)).models
    await asyncio.to_thread(models.refresh)


@router.post("/unload-checkpoint")
async def unload_checkpoint(request: Request) -> JSONResponse:
    """Release the model's memory (after the running and waiting jobs); the next job, or
    ``reload-checkpoint``, reads it again."""
    state = server_state(request)
    models = resources(state).models
    if not models.can_reload():
        raise FieldError(
            "model", "this server was given its model in memory (no loader) and could not read it again"
        )
    await run_on_queue(request, state, lambda: models.unload(state), "unload model")
    return JSONResponse({"loaded": False, "model": models.title(models.current)})


@router.post("/reload-checkpoint")
async def reload_checkpoint(request: Request) -> JSONResponse:
    """Read the chosen model again if it was unloaded (nothing to do when it is in memory)."""
    state = server_state(request)
    models = resources(state).models
    await run_on_queue(request, state, lambda: models.prepare(state), "reload model")
    return JSONResponse({"loaded": True, "model": models.title(models.current)})


@router.get("/sd-vae")
async def sd_vae(request: Request) -> list[dict[str, Any]]:
    """No separate autoencoders are offered: every model decodes with its own (``sd_vae`` Automatic)."""
    return []


@router.get("/cmd-flags")
async def cmd_flags(request: Request) -> dict[str, Any]:
    """How the server was started (``ldm serve``'s options; the API key only as whether there is one)."""
    settings = server_state(request).settings
    limits = settings.limits

    def path(value: Path | None) -> str | None:
        return str(value) if value is not None else None

    return {
        "model": settings.model_source or None,
        "model_dir": path(settings.model_dir),
        "lora_dir": path(settings.lora_dir),
        "controlnet_dir": path(settings.controlnet_dir),
        "output_dir": path(settings.output_dir),
        "api_auth": settings.api_key is not None,
        "max_size": limits.max_side,
        "max_steps": limits.max_steps,
        "max_images": limits.max_images,
        "queue_size": limits.queue_size,
    }


@router.get("/memory")
async def memory(request: Request) -> dict[str, Any]:
    """System memory and, on a CUDA device, the device's, in the web UI's shape (bytes)."""
    return {"ram": ram(), "cuda": await asyncio.to_thread(cuda_memory)}


def ram() -> dict[str, Any]:
    """Physical memory of this machine (``free`` is what the kernel reports available)."""
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
        free = available_bytes() or os.sysconf("SC_AVPHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return {"error": "this system does not report its memory"}
    return {"free": free, "used": total - free, "total": total}


def available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cuda_memory() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(name: str) -> dict[str, int]:
        return {"current": stats.get(f"{name}.all.current", 0), "peak": stats.get(f"{name}.all.peak", 0)}

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": stats.get("num_alloc_retries", 0), "oom": stats.get("num_ooms", 0)},
    }
