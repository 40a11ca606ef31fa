"""Latent walks over HTTP (``Pipeline.walk``, ``pipelines.walk``):

``POST /v1/videos/walks`` (JSON): ``{"prompts": [...], "seeds": [...], "frames": 8, ...}`` ->
``{"created", "data": [{"b64_json"}], "format", "frames", "fps", "size", "seeds", "interrupted"}``: the
walk through the keyframes (one prompt or one seed serves them all), ``frames`` per segment, encoded as
GIF (default), APNG, MP4 or WebM like ``POST /v1/videos/generations``' clips.

The walk runs on the server's queue as one job whose steps are every frame's steps, so progress and
previews follow it frame by frame. An interrupted walk answers the frames finished so far and the
estimate of the one in progress. The limits on size, steps and prompts apply; the walk has at most
``MAX_WALK_FRAMES`` frames in all.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat

from latentdiffusion.serving.common import ServerState, await_job, resolve_seed, server_state
from latentdiffusion.serving.names import resolve_sampler
from latentdiffusion.serving.queue import Job
from latentdiffusion.serving.settings import FieldError, check_count, check_prompt, check_size
from latentdiffusion.serving.video_api import clip_response

router = APIRouter(prefix="/v1", tags=["video"])

MAX_KEYFRAMES = 16
MAX_WALK_FRAMES = 64
Seed = Annotated[int, Field(ge=-1, le=2**32 - 1)]


class WalkRequest(BaseModel):
    """``POST /v1/videos/walks``: keyframe prompts and seeds, frames per segment and the video's format."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[str] = Field(min_length=1, max_length=MAX_KEYFRAMES)
    seeds: list[Seed] = Field(
        default_factory=lambda: [-1],
        min_length=1,
        max_length=MAX_KEYFRAMES,
        description="one per keyframe, or one for all; -1: a random one",
    )
    frames: int = Field(8, ge=1, le=MAX_WALK_FRAMES, description="frames from each keyframe to the next")
    negative_prompt: str | None = None
    size: str | None = Field(None, description="WIDTHxHEIGHT; unset: the model's size")
    steps: int | None = None
    guidance_scale: FiniteFloat | None = None
    sampler: str | None = None
    fps: FiniteFloat = Field(8.0, gt=0, le=60)
    format: Literal["gif", "apng", "mp4", "webm"] = "gif"


def walk_settings(state: ServerState, body: WalkRequest) -> dict[str, Any]:
    """The request as ``Pipeline.walk`` keyword arguments, checked against the server's limits."""
    from latentdiffusion.pipelines.walk import keyframes

    config, limits = state.pipe.config, state.limits
    sampler, sigmas = resolve_sampler(body.sampler, field="sampler", default=config.default_sampler)
    steps = body.steps or config.default_steps
    check_count("steps", steps, limits.max_steps)
    for i, prompt in enumerate(body.prompts):
        check_prompt(limits, f"prompts[{i}]", prompt)
    check_prompt(limits, "negative_prompt", body.negative_prompt or "")
    prompts, seeds = keyframes(body.prompts, [resolve_seed(seed) for seed in body.seeds])
    total = (len(seeds) - 1) * body.frames + 1
    if total > MAX_WALK_FRAMES:
        raise FieldError("frames", f"the walk would have {total} frames; the limit is {MAX_WALK_FRAMES}")
    width, height = walk_size(state, body.size)
    guidance = config.default_guidance_scale if body.guidance_scale is None else body.guidance_scale
    return {
        "prompts": prompts,
        "seeds": seeds,
        "frames": body.frames,
        "negative_prompt": body.negative_prompt or "",
        "width": width,
        "height": height,
        "steps": steps,
        "guidance_scale": guidance,
        "sampler": sampler,
        "sigmas": sigmas,
    }


def walk_size(state: ServerState, size: str | None) -> tuple[int, int]:
    width = height = state.pipe.config.sample_size
    if size is not None:
        width_text, x, height_text = size.lower().partition("x")
        if not (x and width_text.isdigit() and height_text.isdigit()):
            raise FieldError("size", f"expected WIDTHxHEIGHT such as 512x512, got {size!r}")
        width, height = int(width_text), int(height_text)
    check_size(state.limits, state.size_multiple, width, height, prefix="size ")
    return width, height


@router.post("/videos/walks")
async def video_walks(body: WalkRequest, request: Request) -> dict[str, Any]:
    """A latent walk through keyframes, as one video."""
    state = server_state(request)
    settings = walk_settings(state, body)
    if body.format in ("mp4", "webm"):
        from latentdiffusion.pipelines.video_io import import_av

        import_av()  # a missing encoder is refused before the work
    total_frames = (len(settings["seeds"]) - 1) * settings["frames"] + 1
    done: list = []

    def run(callback: Any) -> list:
        def on_step(step: int, steps: int, x: Any, x0: Any) -> None:
            callback(len(done) * steps + step, total_frames * steps, x, x0)  # steps of the whole walk

        return state.pipe.walk(**settings, callback=on_step, on_frame=lambda i, frame: done.append(frame))

    job = Job(work=run, steps=total_frames * settings["steps"], description="walk")
    result = await await_job(request, state, job)
    frames = result.images if not result.interrupted else [*done, *result.images]
    if not frames:
        raise FieldError("frames", "the walk was interrupted before its first step")
    extra = {"seeds": settings["seeds"], "interrupted": result.interrupted}
    return await clip_response(frames, body.fps, body.format, settings, **extra)
