"""Streaming for the OpenAI images API: ``stream: true`` answers with server-sent events, as the
official client parses them (``openai.types.ImageGenStreamEvent`` / ``ImageEditStreamEvent``):

    event: image_generation.partial_image            (``partial_images`` of them, 0..3)
    data: {"type": ..., "b64_json", "partial_image_index", "created_at", "size", "output_format", ...}

    event: image_generation.completed                (one per image, in seed order)
    data: {"type": ..., "b64_json", "created_at", "size", "output_format", "usage", ...}

Edits use ``image_edit.`` in place of ``image_generation.``. A failure after the stream has begun is an
``error`` event whose data is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` (the client
raises it as ``APIError``); failures found before (bad fields, a full queue) are ordinary error answers.

A partial image is the decoded x0 estimate of the batch's first image after a sampling step: the
image the sampler is heading for, which sharpens as the noise level falls. Partial images are spread
evenly over the run; a run with fewer steps than partial images asked for sends fewer (the API allows
that: "the final image may be sent before the full number of partial images").
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse
from PIL import Image

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.sampling import StepCallback
from latentdiffusion.serving.codec import encode_base64
from latentdiffusion.serving.common import POLL_SECONDS, ServerState
from latentdiffusion.serving.queue import Job, JobCancelled, JobResult

log = logging.getLogger(__name__)
EVENT_PREFIX = {"generation": "image_generation", "edit": "image_edit"}
MAX_PARTIAL_IMAGES = 3  # OpenAI's limit
Finish = Callable[[JobResult], Awaitable[list[str]]]  # a job's images -> base64 files, saved if asked


def partial_steps(steps: int, count: int) -> set[int]:
    """The sampling steps (counted from 1) after which the ``count`` partial images are taken:
    spread evenly over the run, never its last step (that one is the completed image)."""
    return {math.ceil(steps * (k + 1) / (count + 1)) for k in range(count)} - {steps}


class PartialImages:
    """Decodes the x0 estimate at the chosen steps in the worker thread and hands each image to the
    event loop of the request that streams them; ``None`` follows the last one."""

    def __init__(self, state: ServerState, count: int) -> None:
        self.state = state
        self.count = count
        self.loop = asyncio.get_running_loop()
        self.images: asyncio.Queue[Image.Image | None] = asyncio.Queue()

    def wrap(self, callback: StepCallback) -> StepCallback:
        """The worker's step callback (progress, cancelling) followed by taking a partial image."""

        def on_step(step: int, steps: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            callback(step, steps, x, x0)
            if self.count and step in partial_steps(steps, self.count):
                image = self.decode(x0[:1])
                self.loop.call_soon_threadsafe(self.images.put_nowait, image)

        return on_step

    @torch.inference_mode()
    def decode(self, x0: torch.Tensor) -> Image.Image:
        from latentdiffusion.pipelines.text_to_image import decode_images
        from latentdiffusion.pipelines.vae_tiling import with_tiled_autoencoder

        return decode_images(with_tiled_autoencoder(self.state.pipe.components), x0)[0]

    def end(self) -> None:
        self.images.put_nowait(None)


def server_sent_event(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def stream_response(
    request: Request,
    state: ServerState,
    job: Job,
    partials: PartialImages,
    kind: str,
    fields: dict[str, Any],
    finish: Finish,
) -> StreamingResponse:
    """Queue ``job`` (``QueueFull`` is raised here, before any event: an ordinary 429) and answer with
    its events. ``fields`` are the events' echoed settings (``output_format``, ``quality``,
    ``background``); ``finish`` encodes the completed images."""
    waiter = asyncio.wrap_future(state.queue.submit(job))
    waiter.add_done_callback(lambda _: partials.end())  # after every partial: both go through the loop
    events = event_stream(request, state, job, waiter, partials, EVENT_PREFIX[kind], fields, finish)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies: do not buffer events
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def event_stream(
    request: Request,
    state: ServerState,
    job: Job,
    waiter: asyncio.Future,
    partials: PartialImages,
    prefix: str,
    fields: dict[str, Any],
    finish: Finish,
) -> AsyncIterator[bytes]:
    """Partial images as they come, then the completed ones; the job is cancelled if the client leaves."""
    output_format = fields["output_format"]
    try:
        index = 0
        while (image := await next_partial(request, partials)) is not None:
            b64 = await asyncio.to_thread(encode_base64, image, output_format)
            size = f"{image.width}x{image.height}"
            data = {"type": f"{prefix}.partial_image", "b64_json": b64, "partial_image_index": index}
            yield server_sent_event(data["type"], {**data, **fields, "size": size, "created_at": now()})
            index += 1
        result = outcome(waiter)
        for image, b64 in zip(result.images, await finish(result), strict=True):
            data = {"type": f"{prefix}.completed", "b64_json": b64, "usage": NO_USAGE}
            size = f"{image.width}x{image.height}"
            yield server_sent_event(data["type"], {**data, **fields, "size": size, "created_at": now()})
    except ClientLeft:
        return
    except Exception as error:  # the answer has begun: report the failure as an event
        yield server_sent_event("error", error_event(error))
    finally:
        if not waiter.done():
            state.queue.cancel(job)
            waiter.cancel()


class ClientLeft(Exception):
    """The client closed the stream."""


async def next_partial(request: Request, partials: PartialImages) -> Image.Image | None:
    """The next partial image (None: the job has ended), watching for the client leaving meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(partials.images.get(), POLL_SECONDS)
        except TimeoutError:
            if await request.is_disconnected():
                raise ClientLeft from None


def outcome(waiter: asyncio.Future) -> JobResult:
    if waiter.cancelled():
        raise JobCancelled("the server is shutting down")
    return waiter.result()


def error_event(error: Exception) -> dict[str, Any]:
    """OpenAI's error object for a failure met while streaming."""
    if isinstance(error, UserError):
        message, kind = str(error), "invalid_request_error"
    elif isinstance(error, JobCancelled):
        message, kind = str(error), "server_error"
    else:
        log.error("internal error while streaming images", exc_info=error)
        message, kind = f"internal error ({type(error).__name__}); see the server log", "server_error"
    field = getattr(error, "field", None)
    return {"error": {"message": message, "type": kind, "param": field, "code": None}}


def now() -> int:
    return int(time.time())


# The client's Usage model requires these; images made here are not metered in tokens.
NO_USAGE = {
    "input_tokens": 0,
    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
    "output_tokens": 0,
    "total_tokens": 0,
}
