"""What the route modules share: the server's state, waiting for a job while watching the client,
turning images into response fields (and saving them), and error bodies in each API's own shape."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image

from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.serving.codec import OutputFolder, encode_base64
from latentdiffusion.serving.queue import Job, JobCancelled, JobQueue, JobResult
from latentdiffusion.serving.settings import Limits, ServerSettings

if TYPE_CHECKING:
    from latentdiffusion.serving.a1111_state import A1111Resources
    from latentdiffusion.serving.controlnet_api import ControlNetLibrary

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2  # how often a waiting handler checks whether its client is still connected
OPENAI_ERROR_TYPES = {401: "authentication_error", 429: "rate_limit_exceeded", 500: "server_error"}


class ClientGone(Exception):
    """The client disconnected while its job waited or ran; the job was cancelled."""


@dataclass
class ServerState:
    """One model, its queue and the settings, shared by every request (``app.state.server``)."""

    pipe: Pipeline
    settings: ServerSettings
    queue: JobQueue
    outputs: OutputFolder | None
    controlnets: ControlNetLibrary  # the ControlNets of settings.controlnet_dir
    a1111: A1111Resources | None = None  # the web UI's models, LoRAs (serving.a1111_state)

    @property
    def limits(self) -> Limits:
        return self.settings.limits

    @property
    def size_multiple(self) -> int:
        """Image sides are multiples of the model family's size multiple (8 and the latent factor)."""
        components = self.pipe.components
        return components.family.latent_format(components.config).size_multiple


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def resolve_seed(seed: int) -> int:
    """-1 picks a seed at random, as the web UI does."""
    return random.randrange(2**32) if seed < 0 else seed


async def await_job(request: Request, state: ServerState, job: Job) -> JobResult:
    """Queue ``job`` and wait for it; cancel it if the client disconnects (``ClientGone``) or the
    handler is cancelled (server shutdown). ``QueueFull`` from the queue propagates (HTTP 429)."""
    waiter = asyncio.wrap_future(state.queue.submit(job))
    try:
        while not waiter.done():
            await asyncio.wait([waiter], timeout=POLL_SECONDS)
            if not waiter.done() and await request.is_disconnected():
                raise ClientGone
    except (ClientGone, asyncio.CancelledError):
        state.queue.cancel(job)
        waiter.cancel()  # the job's late JobCancelled is then dropped, not logged as never retrieved
        raise
    if waiter.cancelled():
        raise JobCancelled("the server is shutting down")
    return waiter.result()


def finish_images(
    state: ServerState, images: list[Image.Image], seeds: list[int], output_format: str = "png"
) -> list[str]:
    """Save the images to the output folder (if the server has one; a failed save, such as a full disk,
    is logged and the images are still answered) and encode them as base64.
    Blocking (PNG encoding, file writes): handlers call it with ``asyncio.to_thread``."""
    if state.outputs is not None and images:
        try:
            state.outputs.save(images, seeds[: len(images)])
        except OSError as error:  # a full disk: the client still gets its images; the log says why
            log.error(
                "could not save to the output folder %s: %s", state.outputs.path, error.strerror or error
            )
    return [encode_base64(image, output_format) for image in images]


def error_response(
    request: Request,
    status: int,
    message: str,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's ``{"error": {...}}`` under /v1, FastAPI's (and the web UI's) ``{"detail": ...}``
    elsewhere; the message always says what was wrong."""
    body: dict[str, Any]
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # never a lone surrogate
    if request.url.path.startswith("/v1/"):
        kind = OPENAI_ERROR_TYPES.get(status, "invalid_request_error")
        body = {"error": {"message": message, "type": kind, "param": field, "code": None}}
    else:
        body = {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """pydantic errors -> ("field: problem; ...", first field), naming fields as clients spell them."""
    parts, fields = [], []
    for error in errors:
        where = [str(part) for part in error.get("loc", ()) if part != "body"]
        name = ".".join(where) if where and error.get("type") != "json_invalid" else "body"
        problem = error.get("msg", "invalid")
        if error.get("type") == "json_invalid":
            problem = f"not valid JSON ({error.get('ctx', {}).get('error', 'decode error')})"
        elif error.get("type") == "missing" and name == "body":
            problem = "a JSON object is required"
        parts.append(f"{name}: {problem}")
        fields.append(name)
    return "; ".join(parts) or "invalid request", (fields[0] if fields else None)
