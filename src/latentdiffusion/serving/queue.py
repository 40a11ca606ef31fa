"""The job queue: one model in memory, one worker thread, requests run one at a time in arrival order.

The queue is bounded: ``submit`` raises ``QueueFull`` (HTTP 429 with a Retry-After estimate) when
``capacity`` jobs already wait behind the running one, so memory stays bounded however many clients
call. A job is a closure over the pipeline call (``Pipeline.generate``, ``img2img``, ``inpaint``) that
takes the worker's step callback; the callback records progress and the current x0 estimate, and stops
a job between sampling steps by raising:

* ``cancel(job)`` (its client went away): a waiting job leaves the queue at once, a running one stops
  and its future raises ``JobCancelled``;
* ``interrupt()`` (the web UI's Interrupt button): the running job stops and returns its current x0
  estimate decoded, as the web UI does, marked ``interrupted``.

Results travel in ``concurrent.futures.Future`` objects, which request handlers await with
``asyncio.wrap_future``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.pipelines.sampling import StepCallback

log = logging.getLogger(__name__)

Work = Callable[[StepCallback], list[Image.Image]]  # runs the pipeline with the worker's step callback
FIRST_GUESS_SECONDS = 5.0  # job duration assumed for Retry-After before any job has finished
DURATION_SMOOTHING = 0.3  # weight of the newest job in the running mean of durations


class QueueFull(Exception):
    """Every place in the queue is taken; try again after ``retry_after`` seconds."""

    def __init__(self, capacity: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({capacity} requests waiting); retry after {retry_after} s")
        self.retry_after = retry_after


class JobCancelled(Exception):
    """The job was cancelled: its client disconnected, or the server is shutting down."""


class _Interrupted(Exception):
    """Raised inside the sampler by the step callback after ``JobQueue.interrupt``."""


@dataclass(frozen=True)
class JobResult:
    images: list[Image.Image]
    interrupted: bool = False  # stopped early: the images are the decoded x0 estimate at that step


@dataclass(eq=False)
class Job:
    """One request's work, its progress (written by the worker thread) and its result."""

    work: Work
    steps: int  # sampling steps expected, for progress before the first step reports the real count
    description: str = ""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    future: Future = field(default_factory=Future)
    step: int = 0
    started: float | None = None  # time.monotonic() when the worker took it
    estimate: torch.Tensor | None = None  # x0 after the last step, [N, C, h, w] diffusion latents
    cancelled: bool = False
    interrupted: bool = False


class JobQueue:
    """Runs jobs on ``pipe`` in a worker thread; at most ``capacity`` jobs wait."""

    def __init__(self, pipe: Pipeline, capacity: int) -> None:
        self.pipe = pipe
        self.capacity = capacity
        self._waiting: deque[Job] = deque()
        self._running: Job | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._previewer: Callable[..., list[Image.Image]] | None = None
        self._mean_seconds = FIRST_GUESS_SECONDS
        self.prepare: Callable[[], None] | None = None  # runs on the worker before each job (load a model)
        self.counts = dict.fromkeys(("submitted", "rejected", "completed", "failed", "cancelled"), 0)
        self.counts["interrupted"] = 0

    # ---- life cycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ldm-serve-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel waiting jobs, stop the running one at its next step, and join the worker."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), deque()
            if self._running is not None:
                self._running.cancelled = True
            self._cond.notify_all()
        for job in waiting:
            job.future.cancel()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- what request handlers call

    def submit(self, job: Job) -> Future:
        """Queue ``job``; raises ``QueueFull`` when ``capacity`` jobs already wait."""
        with self._cond:
            if self._stopping:
                raise JobCancelled("the server is shutting down")
            if len(self._waiting) >= self.capacity:
                self.counts["rejected"] += 1
                raise QueueFull(self.capacity, self._retry_after())
            self._waiting.append(job)
            self.counts["submitted"] += 1
            self._cond.notify()
        return job.future

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or stop a running one at its next sampling step."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.cancel()
                self.counts["cancelled"] += 1
            elif job is self._running:
                job.cancelled = True

    def interrupt(self) -> bool:
        """Stop the running job at its next step; it returns its current estimate. False if idle."""
        with self._cond:
            if self._running is None:
                return False
            self._running.interrupted = True
            return True

    def position(self, job_id: str) -> tuple[Job, int] | None:
        """(job, 0) for the running job, (job, k) for the k-th waiting one, None if unknown/finished."""
        with self._cond:
            if self._running is not None and self._running.id == job_id:
                return self._running, 0
            for k, job in enumerate(self._waiting, start=1):
                if job.id == job_id:
                    return job, k
        return None

    @property
    def running(self) -> Job | None:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "running": int(self._running is not None),
                "waiting": len(self._waiting),
                "capacity": self.capacity,
                **self.counts,
            }

    def preview(self, job: Job) -> Image.Image | None:
        """An approximate image of the job's first sample at its current step (``pipelines.preview``)."""
        estimate = job.estimate
        if estimate is None or self._previewer is None:
            return None
        components = self.pipe.components
        factor = components.family.latent_format(components.config).factor
        return self._previewer(estimate[:1], scale=factor)[0]

    def use(self, pipe: Pipeline) -> None:
        """Serve ``pipe`` from now on (a model switch, on the worker thread); previews follow it."""
        self.pipe, self._previewer = pipe, None
        self._fit_previewer()

    def _retry_after(self) -> int:
        """Seconds until a place frees up, from the running mean of job durations."""
        return max(1, min(3600, math.ceil(self._mean_seconds)))

    # ---- the worker thread

    def _loop(self) -> None:
        self._fit_previewer()
        while (job := self._take()) is not None:
            self._run(job)

    def _fit_previewer(self) -> None:
        """Fit the latent previewer here, once, so that /progress never runs the encoder."""
        from latentdiffusion.pipelines.preview import previewer_for

        try:
            self._previewer = previewer_for(self.pipe.components)
        except Exception:  # previews are a convenience; serving works without them
            log.exception("no live previews: fitting the latent previewer failed")

    def _take(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            self._running = self._waiting.popleft()
            return self._running

    def _run(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            self._finish(job, None)
            return
        job.started = time.monotonic()
        try:
            result = self._execute(job)
        except BaseException as error:  # the handler awaiting the future reports it
            self._finish(job, "cancelled" if isinstance(error, JobCancelled) else "failed")
            job.future.set_exception(error)
            return
        self._finish(job, "interrupted" if result.interrupted else "completed")
        job.future.set_result(result)

    def _execute(self, job: Job) -> JobResult:
        try:
            if self.prepare is not None:
                self.prepare()
            return JobResult(job.work(self._step_callback(job)))
        except _Interrupted:
            return self._partial_result(job)

    def _finish(self, job: Job, outcome: str | None) -> None:
        with self._cond:
            self._running = None
            if outcome is not None:
                self.counts[outcome] += 1
            if job.started is not None and outcome in ("completed", "interrupted"):
                seconds = time.monotonic() - job.started
                self._mean_seconds += DURATION_SMOOTHING * (seconds - self._mean_seconds)
        job.estimate = None  # the handler may keep the job a while; the latents need not stay

    def _step_callback(self, job: Job) -> StepCallback:
        def on_step(step: int, steps: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            if job.cancelled:
                raise JobCancelled("the client disconnected")
            job.step, job.steps, job.estimate = step, steps, x0
            if job.interrupted:
                raise _Interrupted

        return on_step

    @torch.inference_mode()
    def _partial_result(self, job: Job) -> JobResult:
        """The web UI's interrupt: decode the x0 estimate the sampler had reached."""
        from latentdiffusion.pipelines.text_to_image import decode_images
        from latentdiffusion.pipelines.vae_tiling import with_tiled_autoencoder

        if job.estimate is None:
            return JobResult([], interrupted=True)
        return JobResult(decode_images(with_tiled_autoencoder(self.pipe.components), job.estimate), True)
