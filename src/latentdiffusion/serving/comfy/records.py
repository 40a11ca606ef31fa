"""The prompts the ComfyUI API has taken: those queued or running (/queue) and those finished
(/history), in ComfyUI's shapes (``execution.PromptQueue``): a queue item is
``[number, prompt_id, prompt, extra_data, outputs_to_execute]``; a history entry is
``{"prompt": item, "outputs": {node_id: ui}, "status": {"status_str", "completed", "messages"},
"meta": {...}}``. The history keeps the newest ``MAX_HISTORY`` entries.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from latentdiffusion.serving.queue import Job

MAX_HISTORY = 200  # finished prompts kept (each holds its workflow: up to api.MAX_PROMPT_BYTES)


def timestamp() -> int:
    """Milliseconds since the epoch, as ComfyUI stamps its messages."""
    return int(time.time() * 1000)


@dataclass(eq=False)
class Record:
    """One prompt's request, job, progress messages and outputs."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs_to_execute: list[str]
    job: Job | None = None
    running: bool = False
    outputs: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    messages: list[list[Any]] = field(default_factory=list)
    status: str | None = None  # "success" or "error" once finished

    @property
    def client_id(self) -> str | None:
        return self.extra_data.get("client_id")

    def item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs_to_execute]

    def history(self) -> dict[str, Any]:
        status = {"status_str": self.status, "completed": self.status == "success", "messages": self.messages}
        return {"prompt": self.item(), "outputs": self.outputs, "status": status, "meta": self.meta}


class Records:
    """Queued, running and finished prompts; thread-safe (the worker finishes them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, Record] = OrderedDict()  # queued or running, in arrival order
        self._history: OrderedDict[str, Record] = OrderedDict()
        self._number = 0

    def next_number(self, front: bool = False) -> int:
        with self._lock:
            number = -self._number if front else self._number
            self._number += 1
            return number

    def add(self, record: Record) -> None:
        with self._lock:
            self._pending[record.prompt_id] = record

    def drop(self, prompt_id: str) -> Record | None:
        """Forget a prompt that never ran (its job was refused or cancelled)."""
        with self._lock:
            return self._pending.pop(prompt_id, None)

    def start(self, record: Record) -> None:
        with self._lock:
            record.running = True

    def finish(self, record: Record, status: str) -> None:
        """Move a prompt to the history (``status`` "success" or "error")."""
        with self._lock:
            record.status, record.running = status, False
            record.job = None  # its future will hold the failure's traceback (and the frames' tensors)
            self._pending.pop(record.prompt_id, None)
            self._history[record.prompt_id] = record
            while len(self._history) > MAX_HISTORY:
                self._history.popitem(last=False)

    def remaining(self) -> int:
        with self._lock:
            return len(self._pending)

    def pending(self) -> list[Record]:
        with self._lock:
            return list(self._pending.values())

    def queue(self) -> dict[str, list]:
        with self._lock:
            records = list(self._pending.values())
            running = [copy.deepcopy(r.item()) for r in records if r.running]
            waiting = [copy.deepcopy(r.item()) for r in records if not r.running]
        return {"queue_running": running, "queue_pending": waiting}

    def history(self, prompt_id: str | None = None, max_items: int | None = None) -> dict[str, Any]:
        with self._lock:
            if prompt_id is not None:
                found = self._history.get(prompt_id)
                return {prompt_id: copy.deepcopy(found.history())} if found is not None else {}
            records = list(self._history.values())
        if max_items is not None:
            records = records[-max_items:] if max_items > 0 else []
        return {r.prompt_id: copy.deepcopy(r.history()) for r in records}

    def forget(self, prompt_ids: list[str] | None) -> None:
        """Delete history entries (all of them for None)."""
        with self._lock:
            if prompt_ids is None:
                self._history.clear()
            for prompt_id in prompt_ids or ():
                self._history.pop(prompt_id, None)
