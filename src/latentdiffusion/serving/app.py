"""The FastAPI application: routes, the optional API key, the request-size limit, error handling and
the web page; ``serve`` runs it with uvicorn.

Every error a client can cause is a 4xx with a message (never a traceback): 401 without the API key
(checked before the body is read),
413 for a body over the limit, 422 for bad fields (named) and bad images, 429 with Retry-After when the
queue is full. Only a bug in the server answers 500, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from latentdiffusion import __version__
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.serving import a1111_api, controlnet_api, openai_api, video_api, walk_api
from latentdiffusion.serving.codec import OutputFolder
from latentdiffusion.serving.comfy import api as comfy_api
from latentdiffusion.serving.comfy.context import ComfyServer
from latentdiffusion.serving.common import (
    ClientGone,
    ServerState,
    error_response,
    server_state,
    validation_message,
)
from latentdiffusion.serving.connections import ConnectionGuard, guarded_protocol
from latentdiffusion.serving.queue import JobCancelled, JobQueue, QueueFull
from latentdiffusion.serving.settings import FieldError, ServerSettings

log = logging.getLogger(__name__)
CLIENT_CLOSED_REQUEST = 499  # nginx's code for a client that left before the answer; nobody reads it


def web_dir() -> Path:
    return Path(str(resources.files("latentdiffusion.serving") / "web"))


def create_app(pipe: Pipeline, settings: ServerSettings | None = None) -> FastAPI:
    """An application serving ``pipe``; its job queue's worker runs while the application does."""
    settings = settings or ServerSettings()
    outputs = OutputFolder(settings.output_dir) if settings.output_dir is not None else None
    controlnets = controlnet_api.ControlNetLibrary(settings.controlnet_dir)
    state = ServerState(pipe, settings, JobQueue(pipe, settings.limits.queue_size), outputs, controlnets)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.queue.start()
        try:
            yield
        finally:
            state.queue.stop()

    app = FastAPI(
        title="latentdiffusion",
        version=__version__,
        description="Latent diffusion (Stable Diffusion): OpenAI- and AUTOMATIC1111-compatible image APIs.",
        lifespan=lifespan,
    )
    app.state.server = state
    app.state.comfy = ComfyServer(state)  # the ComfyUI API's prompts, files and websocket clients
    body_timeout = settings.connections.body_timeout
    app.add_middleware(BodyLimit, max_bytes=settings.limits.max_body_bytes, timeout=body_timeout)
    app.add_middleware(ApiKeyGuard, api_key=settings.api_key)  # added last: runs first
    add_error_handlers(app)
    app.include_router(openai_api.router)
    app.include_router(a1111_api.router)
    app.include_router(controlnet_api.router)
    app.include_router(video_api.router)
    app.include_router(walk_api.router)
    app.include_router(comfy_api.router)
    app.include_router(comfy_api.router, prefix="/api")  # ComfyUI serves its routes at both
    app.add_api_route("/health", health, methods=["GET"], tags=["server"])
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=web_dir()), name="static")
    return app


def authorised(authorization: str, api_key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time."""
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), api_key.encode())


async def health(request: Request) -> dict[str, Any]:
    """Liveness, the model and its defaults (the web page reads them), and the queue's counters."""
    state = server_state(request)
    config = state.pipe.config
    return {
        "status": "ok",
        "model": state.pipe.components.name,
        "family": state.pipe.family.name,
        "defaults": {
            "size": config.sample_size,
            "size_multiple": state.size_multiple,
            "steps": config.default_steps,
            "cfg_scale": config.default_guidance_scale,
            "sampler": config.default_sampler,
        },
        "limits": vars(state.limits),
        "auth": state.settings.api_key is not None,
        "queue": state.queue.stats(),
        "connections": connection_stats(request),
    }


def connection_stats(request: Request) -> dict[str, int] | None:
    """Connections waiting for a request head, and how many were closed for time or evicted."""
    guard = getattr(request.app.state, "connection_guard", None)  # set by server_config
    return guard.stats() if guard is not None else None


async def page() -> FileResponse:
    return FileResponse(web_dir() / "index.html", media_type="text/html")


def add_error_handlers(app: FastAPI) -> None:
    """Map each failure a client can cause to a 4xx in the shape its API uses (``error_response``)."""

    async def on_validation(request: Request, error: RequestValidationError) -> JSONResponse:
        errors = list(error.errors())
        message, field = validation_message(errors)
        malformed = any(e.get("type") == "json_invalid" for e in errors)  # not JSON at all: 400
        return error_response(request, 400 if malformed else 422, message, field)

    async def on_user_error(request: Request, error: UserError) -> JSONResponse:
        return error_response(request, 422, str(error), getattr(error, "field", None))

    async def on_queue_full(request: Request, error: QueueFull) -> JSONResponse:
        headers = {"Retry-After": str(error.retry_after)}
        return error_response(request, 429, str(error), headers=headers)

    async def on_http(request: Request, error: StarletteHTTPException) -> Response:
        cause = error.__cause__
        if isinstance(cause, UnicodeError):  # FastAPI's 400 for a body that is not UTF-8
            reason = getattr(cause, "reason", None) or type(cause).__name__
            return error_response(request, 422, f"body: not valid UTF-8 text ({reason})")
        return error_response(request, error.status_code, str(error.detail), headers=error.headers)

    async def on_cancelled(request: Request, error: JobCancelled) -> JSONResponse:
        return error_response(request, 503, str(error))

    async def on_client_gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    async def on_bug(request: Request, error: Exception) -> JSONResponse:
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(request, 500, f"internal error ({type(error).__name__}); see the server log")

    handlers: dict[Any, Any] = {
        RequestValidationError: on_validation,
        FieldError: on_user_error,
        UserError: on_user_error,
        QueueFull: on_queue_full,
        StarletteHTTPException: on_http,
        JobCancelled: on_cancelled,
        ClientGone: on_client_gone,
        Exception: on_bug,
    }
    for kind, handler in handlers.items():
        app.add_exception_handler(kind, handler)


class ApiKeyGuard:
    """ASGI middleware: with an API key, the API routes (/v1/, /sdapi/, /controlnet/) answer 401 unless
    the request carries it, before its body is read. The page, /health and the OpenAPI schema stay open."""

    PROTECTED = ("/v1/", "/sdapi/", "/controlnet/", *comfy_api.PROTECTED)

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and self.api_key is not None and scope["path"].startswith(self.PROTECTED):
            header = dict(scope.get("headers", ())).get(b"authorization", b"").decode("latin-1")
            if not authorised(header, self.api_key):
                message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                response = error_response(
                    Request(scope), 401, message, headers={"WWW-Authenticate": "Bearer"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` (413), by Content-Length up front and
    by counting for chunked bodies, so no request can make the server hold more than that; and bodies
    whose next piece does not arrive within ``timeout`` seconds (408), so a client that stops sending
    does not hold its connection and request forever. A body refused midway reaches the application as
    a disconnect; its answer is replaced by the 413 or 408."""

    def __init__(self, app: Any, max_bytes: int, timeout: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self.refuse(scope, receive, send, 413, f"request body larger than {self.max_bytes} bytes")
            return
        received, complete = 0, False
        refusal: tuple[int, str] | None = None

        async def counted() -> dict:
            nonlocal received, complete, refusal
            if complete:  # after the body only a disconnect can come: no time limit
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                refusal = (408, f"request body not received: nothing came for {self.timeout:g} s")
                return {"type": "http.disconnect"}
            complete = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                refusal = (413, f"request body larger than {self.max_bytes} bytes")
                return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: dict) -> None:
            if refusal is None:
                await send(message)

        try:
            await self.app(scope, counted, send_unless_refused)
        except Exception:
            if refusal is None:
                raise
        if refusal is not None:
            await self.refuse(scope, receive, send, *refusal)

    async def refuse(self, scope: dict, receive: Any, send: Any, status: int, message: str) -> None:
        await error_response(Request(scope), status, message)(scope, receive, send)


def server_config(app: FastAPI, host: str = "127.0.0.1", port: int = 7860, **options: Any) -> Any:
    """A ``uvicorn.Config`` for ``app``: in-flight requests get a few seconds at shutdown (their jobs are
    then cancelled); request heads get ``head_timeout`` seconds and connections waiting for one are capped
    per client and in total (``connections.guarded_protocol``: slow clients cannot starve the server);
    connections and requests beyond ``concurrency`` are refused (503) instead of held in memory. The
    limits are the app's ``ServerSettings.connections``."""
    import uvicorn

    limits = app.state.server.settings.connections
    guard = ConnectionGuard(limits)
    app.state.connection_guard = guard  # /health reports its counters
    defaults = {
        "timeout_graceful_shutdown": 5,
        "limit_concurrency": limits.concurrency,
        "timeout_keep_alive": 5,  # seconds an idle keep-alive connection stays open
        "h11_max_incomplete_event_size": 16 * 1024,  # bytes of request head (h11's default, made explicit)
        "http": guarded_protocol(guard),
        "log_level": "info",
    }
    return uvicorn.Config(app, host=host, port=port, **{**defaults, **options})
