"""JobQueue without HTTP: order, the bound, cancellation (waiting and running), interrupt, shutdown."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from PIL import Image

from latentdiffusion.serving.queue import Job, JobCancelled, JobQueue, QueueFull


def wait_for(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def stepping_work(steps: int, gate: threading.Event | None = None, log: list | None = None, name: str = ""):
    """A job that reports ``steps`` steps (x0 = zeros) and optionally waits for ``gate`` first."""

    def work(callback):
        if log is not None:
            log.append(name)
        if gate is not None:
            assert gate.wait(10)
        for step in range(1, steps + 1):
            callback(step, steps, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8))
            time.sleep(0.01)
        return [Image.new("RGB", (8, 8))]

    return work


@pytest.fixture
def queue(tiny_pipe):
    queue = JobQueue(tiny_pipe, capacity=2)
    queue.start()
    yield queue
    queue.stop()
    assert not queue._thread.is_alive()


def test_jobs_run_one_at_a_time_in_order_and_the_bound_holds(queue):
    gate, log = threading.Event(), []
    first = queue.submit(Job(stepping_work(1, gate, log, "first"), steps=1))
    wait_for(lambda: queue.running is not None)
    second = queue.submit(Job(stepping_work(1, None, log, "second"), steps=1))
    third = queue.submit(Job(stepping_work(1, None, log, "third"), steps=1))
    with pytest.raises(QueueFull) as full:
        queue.submit(Job(stepping_work(1), steps=1))
    assert full.value.retry_after >= 1
    gate.set()
    for future in (first, second, third):
        assert len(future.result(10).images) == 1
    assert log == ["first", "second", "third"]
    assert queue.stats()["completed"] == 3 and queue.stats()["rejected"] == 1


def test_cancel_removes_a_waiting_job_and_stops_a_running_one(queue):
    gate = threading.Event()
    running = Job(stepping_work(1000, gate), steps=1000)
    waiting = Job(stepping_work(1), steps=1)
    queue.submit(running)
    wait_for(lambda: queue.running is running)
    queue.submit(waiting)
    queue.cancel(waiting)
    assert waiting.future.cancelled() and queue.waiting == 0
    gate.set()
    wait_for(lambda: running.step > 0)
    queue.cancel(running)
    with pytest.raises(JobCancelled):
        running.future.result(10)
    assert queue.running is None and running.estimate is None


def test_interrupt_returns_the_current_estimate_decoded(queue):
    job = Job(stepping_work(1000), steps=1000)
    queue.submit(job)
    wait_for(lambda: job.step > 2)
    assert queue.preview(job).size == (16, 16)  # latents 8x8, autoencoder factor 2
    assert queue.interrupt()
    result = job.future.result(10)
    assert result.interrupted and result.images[0].size == (16, 16)
    assert not queue.interrupt()  # nothing runs any more


def test_failures_reach_the_future_and_the_worker_keeps_going(queue):
    def broken(callback):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        queue.submit(Job(broken, steps=1)).result(10)
    assert queue.submit(Job(stepping_work(1), steps=1)).result(10).images


def test_stop_cancels_everything_and_joins(tiny_pipe):
    queue = JobQueue(tiny_pipe, capacity=4)
    queue.start()
    gate = threading.Event()
    running = Job(stepping_work(1000, gate), steps=1000)
    queue.submit(running)
    wait_for(lambda: queue.running is running)
    waiting = queue.submit(Job(stepping_work(1), steps=1))
    gate.set()
    queue.stop()
    assert not queue._thread.is_alive()
    assert waiting.cancelled()
    with pytest.raises(JobCancelled):
        running.future.result(1)
    with pytest.raises(JobCancelled):
        queue.submit(Job(stepping_work(1), steps=1))
