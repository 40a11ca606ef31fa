"""ComfyUI's HTTP API (``server.py``), at the root and under /api as ComfyUI serves it:

- POST /prompt: a workflow in API format (``{"prompt": {...}, "client_id": ...}``), validated at once
  (400 ``{"error": {...}, "node_errors": {...}}`` naming the nodes), then queued as one job of the
  server's queue: ``{"prompt_id", "number", "node_errors"}``. GET /prompt: the queue's length.
- GET/POST /queue (running and pending prompts; ``clear``/``delete`` pending ones), GET/POST /history
  (and /history/{prompt_id}), GET /view (a file by filename, subfolder, type), POST /upload/image and
  /upload/mask, GET /object_info (and /object_info/{node}), GET /system_stats, POST /interrupt,
  GET /embeddings, and the websocket /ws?clientId= (``ws``).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import platform
import sys
import uuid
from typing import Any

import torch
from fastapi import APIRouter, Request, WebSocket
from fastapi.responses import JSONResponse, Response
from PIL import Image

from latentdiffusion import __version__
from latentdiffusion.errors import UserError
from latentdiffusion.serving.codec import decode_image
from latentdiffusion.serving.comfy.catalog import NODES
from latentdiffusion.serving.comfy.context import ComfyServer
from latentdiffusion.serving.comfy.executor import estimated_steps, queue_status, work
from latentdiffusion.serving.comfy.files import FOLDERS, check_name
from latentdiffusion.serving.comfy.graph import error, validate
from latentdiffusion.serving.comfy.records import Record
from latentdiffusion.serving.queue import Job, QueueFull

router = APIRouter(tags=["ComfyUI"])
# the routes an API key guards (``app.ApiKeyGuard``; the websocket checks it itself)
PROTECTED = ("/prompt", "/queue", "/history", "/view", "/upload/", "/object_info", "/system_stats")
PROTECTED += ("/interrupt", "/embeddings", "/api/")
MAX_PROMPT_BYTES = 2 * 2**20  # a workflow (with its UI graph in extra_data) is kilobytes; history keeps them


def comfy(request: Request | WebSocket) -> ComfyServer:
    """The app's ComfyUI state (``app.state.comfy``); the websocket hub learns the event loop here."""
    server = request.app.state.comfy
    server.hub.bind(asyncio.get_running_loop())
    return server


def refusal(
    status: int, kind: str, message: str, details: str = "", headers: dict | None = None
) -> JSONResponse:
    return JSONResponse({"error": error(kind, message, details), "node_errors": {}}, status, headers=headers)


async def json_body(request: Request) -> Any:
    body = await request.body()
    if len(body) > MAX_PROMPT_BYTES:
        raise UserError(f"body: {len(body)} bytes; a ComfyUI request may have at most {MAX_PROMPT_BYTES}")
    try:
        return json.loads(body, parse_constant=_no_constant)
    except RecursionError:
        raise UserError("body: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as problem:
        raise UserError(f"body: not valid JSON ({problem})") from None


def _no_constant(name: str) -> Any:
    """NaN and Infinity are not JSON: refused, or the history could not be answered as JSON."""
    raise ValueError(f"{name} is not a JSON number")


@router.post("/prompt")
async def post_prompt(request: Request) -> JSONResponse:
    server = comfy(request)
    body = await json_body(request)
    if not isinstance(body, dict) or "prompt" not in body:
        return refusal(400, "no_prompt", "No prompt provided", "No prompt provided")
    prompt = body["prompt"]
    checked = validate(prompt, NODES, server)
    if checked.error is not None:
        return JSONResponse({"error": checked.error, "node_errors": checked.node_errors}, 400)
    extra_data = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
    if isinstance(body.get("client_id"), str):
        extra_data["client_id"] = body["client_id"]
    number = body.get("number")
    if not isinstance(number, int | float) or isinstance(number, bool):
        number = server.records.next_number(front=bool(body.get("front")))
    record = Record(number, str(uuid.uuid4()), prompt, extra_data, checked.outputs)
    record.job = Job(
        work(server, record), estimated_steps(prompt, checked.outputs), f"ComfyUI {record.prompt_id}"
    )
    server.records.add(record)
    try:
        future = server.state.queue.submit(record.job)
    except QueueFull as full:
        server.records.drop(record.prompt_id)
        headers = {"Retry-After": str(full.retry_after)}
        return refusal(429, "queue_full", str(full), headers=headers)
    future.add_done_callback(lambda f: _forget_if_cancelled(server, record, f))
    server.hub.send("status", {"status": queue_status(server)})
    return JSONResponse({"prompt_id": record.prompt_id, "number": number, "node_errors": checked.node_errors})


def _forget_if_cancelled(server: ComfyServer, record: Record, future: Any) -> None:
    """A prompt taken off the queue before it ran leaves no history, as in ComfyUI."""
    if future.cancelled() and not record.running and server.records.drop(record.prompt_id) is not None:
        server.hub.send("status", {"status": queue_status(server)})


@router.get("/prompt")
async def get_prompt(request: Request) -> dict[str, Any]:
    return queue_status(comfy(request))


@router.get("/queue")
async def get_queue(request: Request) -> dict[str, list]:
    return comfy(request).records.queue()


@router.post("/queue")
async def post_queue(request: Request) -> Response:
    """``{"clear": true}`` or ``{"delete": [prompt_id, ...]}``: take pending prompts off the queue."""
    server = comfy(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise UserError("body: a JSON object with 'clear' or 'delete' is required")
    wanted = set(body.get("delete") or []) if not body.get("clear") else None
    for record in server.records.pending():
        job = record.job  # None once the worker has finished it
        if job is not None and not record.running and (wanted is None or record.prompt_id in wanted):
            server.state.queue.cancel(job)
    return Response(status_code=200)


@router.get("/history")
async def get_history(request: Request, max_items: int | None = None) -> dict[str, Any]:
    return comfy(request).records.history(max_items=max_items)


@router.get("/history/{prompt_id}")
async def get_history_entry(prompt_id: str, request: Request) -> dict[str, Any]:
    return comfy(request).records.history(prompt_id)


@router.post("/history")
async def post_history(request: Request) -> Response:
    server = comfy(request)
    body = await json_body(request)
    if not isinstance(body, dict):
        raise UserError("body: a JSON object with 'clear' or 'delete' is required")
    if body.get("clear"):
        server.records.forget(None)
    server.records.forget([str(p) for p in body.get("delete") or []])
    return Response(status_code=200)


@router.post("/interrupt")
async def post_interrupt(request: Request) -> Response:
    """Stop the running ComfyUI prompt (the one named by ``prompt_id``, if given) at its next step."""
    server = comfy(request)
    body = await request.body()
    wanted = None
    if body.strip():
        parsed = await json_body(request)
        wanted = parsed.get("prompt_id") if isinstance(parsed, dict) else None
    for record in server.records.pending():
        job = record.job  # None once the worker has finished it
        if job is not None and record.running and wanted in (None, record.prompt_id):
            job.interrupted = True
    return Response(status_code=200)


@router.get("/view")
async def view(request: Request, filename: str, subfolder: str = "", type: str = "output") -> Response:
    server = comfy(request)
    if type not in FOLDERS:
        return Response(status_code=400)
    try:
        check_name(filename, "filename")
        check_name(subfolder, "subfolder")
    except UserError:
        return Response(status_code=400)
    data = server.files.get((type, subfolder, filename))
    if data is None:
        return Response(status_code=404)
    media = "image/png" if filename.lower().endswith(".png") else "application/octet-stream"
    if not filename.lower().endswith(".png"):
        media = Image.MIME.get(Image.open(io.BytesIO(data)).format or "", media)
    return Response(data, media_type=media, headers={"Content-Disposition": f'filename="{filename}"'})


@router.post("/upload/image")
async def upload_image(request: Request) -> dict[str, str]:
    return await _upload(request, mask=False)


@router.post("/upload/mask")
async def upload_mask(request: Request) -> dict[str, str]:
    """A mask painted over an uploaded image: the image with the mask's alpha (``original_ref`` names it)."""
    return await _upload(request, mask=True)


async def _upload(request: Request, mask: bool) -> dict[str, str]:
    server = comfy(request)
    limits = server.state.limits
    async with request.form(max_files=1, max_fields=16) as form:
        upload = form.get("image")
        if upload is None or isinstance(upload, str) or not upload.filename:
            raise UserError("image: a file upload is required")
        data = await upload.read()
        folder = str(form.get("type") or "input")
        subfolder = str(form.get("subfolder") or "")
        overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
        reference = form.get("original_ref")
        filename = os.path.basename(upload.filename)
    if folder not in FOLDERS:
        raise UserError(f"type: one of {list(FOLDERS)}, got {folder!r}")
    picture = await asyncio.to_thread(decode_image, data, "image", limits)
    if mask:
        data = await asyncio.to_thread(_masked, server, reference, picture, limits)
    name = server.files.upload(folder, subfolder, filename, data, overwrite)
    return {"name": name, "subfolder": subfolder, "type": folder}


def _masked(server: ComfyServer, reference: Any, mask: Image.Image, limits: Any) -> bytes:
    """The referenced image with ``mask``'s alpha channel, as PNG (ComfyUI's /upload/mask)."""
    try:
        ref = json.loads(str(reference))
        key = (ref.get("type", "input"), ref.get("subfolder", ""), ref["filename"])
    except (ValueError, TypeError, KeyError, AttributeError):
        raise UserError(
            "original_ref: JSON naming the uploaded image ({'filename', 'subfolder', 'type'})"
        ) from None
    original = server.files.get(key)
    if original is None:
        raise UserError(f"original_ref: no image {key[2]!r} in {key[0]}/{key[1]}")
    image = decode_image(original, "original_ref", limits).convert("RGBA")
    alpha = mask.convert("RGBA").getchannel("A")
    if alpha.size != image.size:
        alpha = alpha.resize(image.size)
    image.putalpha(alpha)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@router.get("/object_info")
async def object_info(request: Request) -> dict[str, Any]:
    server = comfy(request)
    return {name: node.info(server) for name, node in NODES.items()}


@router.get("/object_info/{node_class}")
async def object_info_node(node_class: str, request: Request) -> dict[str, Any]:
    server = comfy(request)
    node = NODES.get(node_class)
    return {node_class: node.info(server)} if node is not None else {}


@router.get("/embeddings")
async def embeddings() -> list[str]:
    return []


@router.get("/system_stats")
async def system_stats(request: Request) -> dict[str, Any]:
    from latentdiffusion.pipelines.text_to_image import available_memory

    device = comfy(request).state.pipe.components.device
    total, free = _device_memory(device)
    ram_free = available_memory() or 0
    return {
        "system": {
            "os": os.name,
            "ram_total": _ram_total(),
            "ram_free": ram_free,
            "comfyui_version": f"latentdiffusion {__version__}",
            "python_version": sys.version,
            "pytorch_version": torch.__version__,
            "embedded_python": False,
            "argv": ["ldm", "serve"],
        },
        "devices": [
            {
                "name": torch.cuda.get_device_name(device)
                if device.type == "cuda"
                else platform.processor() or "cpu",
                "type": device.type,
                "index": device.index,
                "vram_total": total,
                "vram_free": free,
                "torch_vram_total": total,
                "torch_vram_free": free,
            }
        ],
    }


def _device_memory(device: torch.device) -> tuple[int, int]:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return total, free
    return _ram_total(), 0


def _ram_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


@router.websocket("/ws")
async def websocket(websocket: WebSocket, clientId: str = "") -> None:
    server = comfy(websocket)
    api_key = server.state.settings.api_key
    if api_key is not None:
        from latentdiffusion.serving.app import authorised

        if not authorised(websocket.headers.get("authorization", ""), api_key):
            await websocket.close(code=1008)
            return
    await server.hub.serve(websocket, clientId, {"status": queue_status(server)})
