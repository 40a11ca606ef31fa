"""Running a validated workflow as one job of the server's queue (one job at a time, whatever API sent
it): the nodes its outputs need, each after its inputs (``graph.evaluation_order``), with ComfyUI's
websocket messages on the way (``ws``) and the outcome in the history (``records``).

A node that fails ends the prompt with "execution_error" naming it (a bad input is a ``UserError``
whose message says what was wrong); /interrupt ends it at the next sampling step with
"execution_interrupted". Either way the LoRAs the workflow merged are taken out again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.sampling import SamplingOptions, StepCallback
from latentdiffusion.serving.comfy.catalog import NODES
from latentdiffusion.serving.comfy.context import ComfyServer
from latentdiffusion.serving.comfy.graph import evaluation_order, is_link
from latentdiffusion.serving.comfy.lora import WeightPatcher
from latentdiffusion.serving.comfy.records import Record, timestamp
from latentdiffusion.serving.comfy.values import Conditioning
from latentdiffusion.serving.queue import Job

if TYPE_CHECKING:
    from latentdiffusion.serving.a1111_models import ModelEntry

log = logging.getLogger(__name__)


class Run:
    """One prompt being executed: what its nodes may use, and its messages."""

    def __init__(self, server: ComfyServer, record: Record, job: Job, step: StepCallback) -> None:
        self.server, self.record, self.job = server, record, job
        self.components: Components = server.state.queue.pipe.components  # the model the worker serves
        self.patcher = WeightPatcher(self.components)
        self.checkpoint: ModelEntry | None = None  # the model a CheckpointLoaderSimple chose
        self.node: str | None = None
        self.executed: list[str] = []
        self._queue_step = step

    def use_checkpoint(self, entry: ModelEntry) -> Components:
        """The components of model ``entry``, switching the server to it if another is loaded; one
        workflow uses one model (the other's weights are released when it loads)."""
        if self.checkpoint is not None and entry != self.checkpoint:
            raise UserError(
                f"this workflow loads {self.checkpoint.name!r} and {entry.name!r}; the server keeps one "
                "model in memory: use one checkpoint per workflow"
            )
        self.checkpoint = entry
        library = self.server.models()
        if entry != library.current or not library.loaded:
            self.patcher.restore()
            library.load(self.server.state, entry)
            self.components = self.server.state.queue.pipe.components
            self.patcher = WeightPatcher(self.components)
        return self.components

    @property
    def prompt(self) -> dict[str, Any]:
        return self.record.prompt

    @property
    def prompt_id(self) -> str:
        return self.record.prompt_id

    @property
    def extra_data(self) -> dict[str, Any]:
        return self.record.extra_data

    def send(self, kind: str, data: dict[str, Any], keep: bool = False) -> None:
        """A message to the prompt's client (if it gave its id); ``keep`` also puts it in the history."""
        data = {**data, "prompt_id": self.prompt_id}
        if keep:
            self.record.messages.append([kind, data])
        if self.record.client_id is not None:
            self.server.hub.send(kind, data, self.record.client_id)

    def on_step(self, step: int, steps: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        """The queue's step callback (progress, interrupt, cancel), then ComfyUI's "progress"."""
        self._queue_step(step, steps, x, x0)
        self.send("progress", {"value": step, "max": steps, "node": self.node})

    def controlled(
        self,
        components: Components,
        positive: Conditioning,
        options: SamplingOptions,
        sigmas: torch.Tensor,
        width: int,
        height: int,
        batch: int,
    ) -> Components:
        """``components`` as the served pipeline runs them (its U-Net on the pipeline's backend), with the
        ControlNets applied to ``positive`` around its network."""
        components = self.server.state.queue.pipe.served(components)
        if not positive.controls:
            return components
        from latentdiffusion.pipelines.control import Control, controlled
        from latentdiffusion.pipelines.request import Request

        units = tuple(
            Control(
                h.network, h.image, h.strength, h.start, h.end, resize_mode="Crop and Resize", name=h.name
            )
            for h in positive.controls
        )
        request = Request([""] * batch, [""] * batch, list(range(batch)), options, control=units)
        return controlled(components, request, sigmas, width, height)


def estimated_steps(prompt: dict[str, Any], outputs: list[str]) -> int:
    """Sampling steps of the sampler nodes the outputs need (the queue's first progress estimate)."""
    total = 0
    for node_id in evaluation_order(prompt, outputs, NODES):
        node = prompt[node_id]
        if node["class_type"] in ("KSampler", "KSamplerAdvanced"):
            steps = node["inputs"].get("steps")
            total += steps if isinstance(steps, int) else 0
    return max(total, 1)


def work(server: ComfyServer, record: Record) -> Callable[[StepCallback], list[Image.Image]]:
    """The queue job's work: execute the prompt, record the outcome, and re-raise a failure so that the
    queue counts it (its result is never awaited: the history and the websocket carry it)."""

    def run(step: StepCallback) -> list[Image.Image]:
        execution = Run(server, record, record.job, step)
        server.records.start(record)
        server.hub.send("status", {"status": queue_status(server)})
        try:
            with torch.inference_mode():
                execute(execution)
        except BaseException as failure:
            finish(server, record, execution, failure)
            raise
        finally:
            execution.patcher.restore()
        finish(server, record, execution, None)
        return []

    return run


def execute(run: Run) -> None:
    run.send("execution_start", {"timestamp": timestamp()}, keep=True)
    run.send("execution_cached", {"nodes": [], "timestamp": timestamp()}, keep=True)
    values: dict[str, tuple] = {}
    for node_id in evaluation_order(run.prompt, run.record.outputs_to_execute, NODES):
        run.node = node_id
        node = run.prompt[node_id]
        kind = NODES[node["class_type"]]
        run.send("executing", {"node": node_id, "display_node": node_id})
        inputs = {
            name: values[str(value[0])][value[1]] if is_link(value) else value
            for name, value in node["inputs"].items()
            if name in kind.inputs()
        }
        result = kind.run(run, **inputs)
        if kind.output_node:
            run.record.outputs[node_id] = result
            run.record.meta[node_id] = {
                "node_id": node_id,
                "display_node": node_id,
                "parent_node": None,
                "real_node_id": node_id,
            }
            run.send("executed", {"node": node_id, "display_node": node_id, "output": result})
            values[node_id] = ()
        else:
            values[node_id] = result
        run.executed.append(node_id)
    run.node = None


def finish(server: ComfyServer, record: Record, run: Run, failure: BaseException | None) -> None:
    """Write the outcome to the history, then tell the client (ComfyUI's clients fetch /history when
    they see the outcome or "executing" with node null)."""
    kind, data, status = outcome(run, failure)
    data = {**data, "timestamp": timestamp()}
    record.messages.append([kind, {**data, "prompt_id": record.prompt_id}])
    server.records.finish(record, status)
    run.send(kind, data)
    run.send("executing", {"node": None, "display_node": None})
    server.hub.send("status", {"status": queue_status(server)})


def outcome(run: Run, failure: BaseException | None) -> tuple[str, dict[str, Any], str]:
    """(message type, its data, history status) for a prompt that ran to the end or failed."""
    if failure is None:
        return "execution_success", {}, "success"
    if run.job.interrupted:
        run.job.estimate = None  # nothing to decode: ComfyUI keeps no partial image
        details = {"node_id": run.node, "node_type": _node_type(run), "executed": run.executed}
        return "execution_interrupted", details, "error"
    return "execution_error", error_details(run, failure), "error"


def error_details(run: Run, failure: BaseException) -> dict[str, Any]:
    """ComfyUI's "execution_error" data; a UserError's message says what to change."""
    if not isinstance(failure, UserError | ValueError):
        log.error("ComfyUI prompt %s failed in node %s", run.prompt_id, run.node, exc_info=failure)
    kind = type(failure)
    return {
        "node_id": run.node,
        "node_type": _node_type(run),
        "executed": run.executed,
        "exception_message": str(failure) or kind.__name__,
        "exception_type": f"{kind.__module__}.{kind.__qualname__}",
        "traceback": [],  # the server's log has it; clients get the message
        "current_inputs": {},
        "current_outputs": {},
    }


def _node_type(run: Run) -> str | None:
    return run.prompt[run.node]["class_type"] if run.node is not None else None


def queue_status(server: ComfyServer) -> dict[str, Any]:
    return {"exec_info": {"queue_remaining": server.records.remaining()}}
