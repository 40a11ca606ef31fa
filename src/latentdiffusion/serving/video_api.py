"""Text-to-video over HTTP with AnimateDiff motion modules (``Pipeline.animate``):

* ``GET /v1/motion-modules``: the motion modules the server offers (``ldm serve --motion-dir DIR``: the
  files .safetensors/.ckpt/.pt/.pth/.bin and MotionAdapter folders with a ``config.json`` directly in it);
* ``POST /v1/videos/generations`` (JSON): ``{"prompt", "motion_module": NAME, "frames": 16, ...}`` ->
  ``{"created", "data": [{"b64_json"}], "format", "frames", "fps", "size", "seed"}``, the clip encoded
  as GIF (default), APNG, MP4 or WebM (``pipelines.video_io``; MP4/WebM need the ``video`` extra).

A module is named by its file or folder name, or its stem, in any case; on the default model "default"
(also the field's default) is the motion module shipped for it. The last one used stays loaded.
The job runs on the server's queue like an image request; the limits on size, steps and prompts apply,
and ``frames`` is at most ``MAX_FRAMES``.
"""

from __future__ import annotations

import asyncio
import base64
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from latentdiffusion.serving.common import ServerState, await_job, resolve_seed, server_state
from latentdiffusion.serving.names import resolve_sampler
from latentdiffusion.serving.queue import Job
from latentdiffusion.serving.settings import FieldError, check_count, check_prompt, check_size

router = APIRouter(prefix="/v1", tags=["video"])

MAX_FRAMES = 64
MODULE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
FORMATS = {"gif": ".gif", "apng": ".apng", "mp4": ".mp4", "webm": ".webm"}


class VideoRequest(BaseModel):
    """``POST /v1/videos/generations``: a prompt, a motion module by name and the clip's settings."""

    model_config = ConfigDict(extra="forbid")

    prompt: str
    motion_module: str = Field("default", description="a module of --motion-dir; 'default': the shipped one")
    negative_prompt: str | None = None
    frames: int = Field(16, ge=1, le=MAX_FRAMES)
    context: int | None = Field(16, ge=1, description="sliding windows of this many frames; null: none")
    overlap: int = Field(4, ge=0)
    window_weighting: Literal["pyramid", "uniform"] = "pyramid"
    size: str | None = Field(None, description="WIDTHxHEIGHT; unset: the model's size")
    steps: int | None = None
    guidance_scale: FiniteFloat | None = None
    sampler: str | None = None
    seed: int = Field(-1, ge=-1, le=2**32 - 1)
    fps: FiniteFloat = Field(8.0, gt=0, le=60)
    format: Literal["gif", "apng", "mp4", "webm"] = "gif"


def offered_modules(folder: Path | None) -> dict[str, Path]:
    """The motion modules directly inside ``folder`` by lower-case name: file/folder name and stem."""
    if folder is None:
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        usable = path.is_file() and path.suffix.lower() in MODULE_SUFFIXES
        if usable or (path.is_dir() and (path / "config.json").is_file()):
            found.setdefault(path.stem.lower(), path)
            found.setdefault(path.name.lower(), path)
    return found


def shipped_module(state: ServerState) -> Path | None:
    """The motion module shipped for the default model when the server runs that model and it is installed."""
    from latentdiffusion.errors import UserError
    from latentdiffusion.pipelines.animate import SHIPPED_MOTION_MODEL, shipped_motion_module

    if state.pipe.components.name != SHIPPED_MOTION_MODEL:
        return None
    try:
        return shipped_motion_module()
    except UserError:
        return None


def find_module(state: ServerState, name: str) -> Path:
    from latentdiffusion.pipelines.animate import SHIPPED_MOTION

    folder = state.settings.motion_dir
    path = offered_modules(folder).get(name.lower())
    if path is None and name.lower() == SHIPPED_MOTION:
        path = shipped_module(state)
    if path is not None:
        return path
    if folder is None:
        raise FieldError("motion_module", "this server offers no motion modules (ldm serve --motion-dir DIR)")
    names = sorted({p.name for p in offered_modules(folder).values()})
    raise FieldError("motion_module", f"unknown motion module {name!r}; offered: {', '.join(names)}")


class LoadedModule:
    """The last motion module used, kept for the next request (one at a time: they are large)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.key: tuple[str, float] | None = None
        self.modules: Any = None

    def get(self, path: Path) -> Any:
        from latentdiffusion.pipelines.animate import load_motion

        key = (str(path), path.stat().st_mtime)
        with self.lock:
            if self.key != key:
                self.modules, self.key = None, None  # free the old one before reading the next
                self.modules, self.key = load_motion(path), key
            return self.modules


def loaded_module(request: Request) -> LoadedModule:
    app_state = request.app.state
    if getattr(app_state, "motion_module", None) is None:
        app_state.motion_module = LoadedModule()
    return app_state.motion_module


def clip_settings(state: ServerState, body: VideoRequest) -> dict[str, Any]:
    """The request as ``Pipeline.animate`` keyword arguments, checked against the server's limits."""
    config, limits = state.pipe.config, state.limits
    sampler, sigmas = resolve_sampler(body.sampler, field="sampler", default=config.default_sampler)
    steps = body.steps or config.default_steps
    check_count("steps", steps, limits.max_steps)
    check_prompt(limits, "prompt", body.prompt)
    check_prompt(limits, "negative_prompt", body.negative_prompt or "")
    width = height = config.sample_size
    if body.size is not None:
        width_text, x, height_text = body.size.lower().partition("x")
        if not (x and width_text.isdigit() and height_text.isdigit()):
            raise FieldError("size", f"expected WIDTHxHEIGHT such as 512x512, got {body.size!r}")
        width, height = int(width_text), int(height_text)
    check_size(limits, state.size_multiple, width, height, prefix="size ")
    guidance = config.default_guidance_scale if body.guidance_scale is None else body.guidance_scale
    return {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt or "",
        "width": width,
        "height": height,
        "frames": body.frames,
        "context": body.context,
        "overlap": body.overlap,
        "window_weighting": body.window_weighting,
        "steps": steps,
        "guidance_scale": guidance,
        "sampler": sampler,
        "sigmas": sigmas,
        "seed": resolve_seed(body.seed),
    }


def encode_clip(frames: list, fps: float, format: str) -> bytes:
    """The frames as a video file's bytes (written to a temporary folder, read back)."""
    from latentdiffusion.pipelines.video_io import write_video

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"clip{FORMATS[format]}"
        write_video(frames, path, fps)
        return path.read_bytes()


async def clip_response(
    frames: list, fps: float, format: str, settings: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """The reply of a clip endpoint: the encoded clip (base64) and what it holds, plus ``extra``."""
    data = await asyncio.to_thread(encode_clip, frames, fps, format)
    return {
        "created": int(time.time()),
        "data": [{"b64_json": base64.b64encode(data).decode("ascii")}],
        "format": format,
        "frames": len(frames),
        "fps": fps,
        "size": f"{settings['width']}x{settings['height']}",
        **extra,
    }


@router.get("/motion-modules")
async def motion_modules(request: Request) -> dict[str, Any]:
    """The motion modules offered for ``motion_module``."""
    state = server_state(request)
    from latentdiffusion.pipelines.animate import SHIPPED_MOTION

    offered = offered_modules(state.settings.motion_dir)
    names = [path.name for path in sorted(set(offered.values()))]
    if SHIPPED_MOTION not in offered and shipped_module(state) is not None:
        names.append(SHIPPED_MOTION)
    return {"object": "list", "data": [{"id": name, "object": "motion_module"} for name in names]}


@router.post("/videos/generations")
async def video_generations(body: VideoRequest, request: Request) -> dict[str, Any]:
    """A clip from a prompt with a motion module."""
    state = server_state(request)
    settings = clip_settings(state, body)
    path = find_module(state, body.motion_module)
    if body.format in ("mp4", "webm"):
        from latentdiffusion.pipelines.video_io import import_av

        import_av()  # a missing encoder is refused before the work
    cache = loaded_module(request)
    from latentdiffusion.pipelines.animate import motion_words_dir

    def run(callback: Any) -> list:
        def on_step(step: int, steps: int, x: Any, x0: Any) -> None:
            # the queue previews and, on an interrupt, decodes x0 as images: the clip's frames are those
            callback(step, steps, x, x0.transpose(1, 2).flatten(0, 1))

        words = motion_words_dir(path)  # the words learned with the module, beside its file
        return state.pipe.animate(
            **settings, motion_module=cache.get(path), motion_words=words, callback=on_step
        )

    result = await await_job(request, state, Job(work=run, steps=settings["steps"], description="video"))
    frames = result.images
    if not frames:
        raise FieldError("frames", "the clip was interrupted before its first step")
    return await clip_response(frames, body.fps, body.format, settings, seed=settings["seed"])
