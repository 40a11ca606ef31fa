"""ComfyUI's websocket (``/ws?clientId=``): JSON messages ``{"type": ..., "data": {...}}``.

A client gets "status" (``{"status": {"exec_info": {"queue_remaining": n}}, "sid": id}``) when it
connects and whenever the queue changes, and, for the prompts it sent with its ``client_id``:
"execution_start", "execution_cached", "executing" (``{"node", "display_node", "prompt_id"}``; node
null when the prompt is done), "progress" (``{"value", "max", "prompt_id", "node"}``, once per sampling
step), "executed" (``{"node", "display_node", "output", "prompt_id"}``), then "execution_success",
"execution_error" or "execution_interrupted". The worker thread posts messages with ``send`` (thread
safe); each connection's handler writes its own outbox in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect

OUTBOX_SIZE = 1024  # messages a slow client may have waiting; beyond that the oldest are dropped


class Hub:
    """The connected clients by id, and delivery of messages to them from any thread."""

    def __init__(self) -> None:
        self._outboxes: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def send(self, kind: str, data: dict[str, Any], sid: str | None = None) -> None:
        """Post a message to client ``sid`` (None: to every client); callable from any thread."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is listening
            loop.call_soon_threadsafe(self._deliver, {"type": kind, "data": data}, sid)

    def _deliver(self, message: dict[str, Any], sid: str | None) -> None:
        targets = list(self._outboxes.values()) if sid is None else [self._outboxes.get(sid)]
        for outbox in targets:
            if outbox is None:
                continue
            if outbox.full():
                outbox.get_nowait()
            outbox.put_nowait(message)

    async def serve(self, websocket: WebSocket, client_id: str, first: dict[str, Any]) -> None:
        """Run one connection: ``first`` (its status) with its id, then its messages until it closes."""
        self.bind(asyncio.get_running_loop())
        sid = client_id or uuid.uuid4().hex
        outbox: asyncio.Queue = asyncio.Queue(OUTBOX_SIZE)
        self._outboxes[sid] = outbox  # a reconnecting client replaces its old connection
        await websocket.accept()
        closed = asyncio.ensure_future(_until_closed(websocket))
        try:
            await websocket.send_json({"type": "status", "data": {**first, "sid": sid}})
            while True:
                message = asyncio.ensure_future(outbox.get())
                done, _ = await asyncio.wait({message, closed}, return_when=asyncio.FIRST_COMPLETED)
                if closed in done:
                    message.cancel()
                    return
                await websocket.send_json(message.result())
        except (WebSocketDisconnect, RuntimeError, OSError):
            return
        finally:
            closed.cancel()
            if self._outboxes.get(sid) is outbox:
                del self._outboxes[sid]


async def _until_closed(websocket: WebSocket) -> None:
    """Read (and ignore) what the client sends until it disconnects."""
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
