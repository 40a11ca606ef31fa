"""Load (bounded, loopback only): 50 concurrent requests against a queue of 8.

Every request gets its own image or a 429 with Retry-After; none is lost or duplicated (each answer
carries the prompt and seed its request sent, and the server's counters agree); memory stays bounded
over repeated bursts; /health answers throughout.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time

import httpx
from PIL import Image

from latentdiffusion.serving.queue import Job
from latentdiffusion.serving.settings import Limits, ServerSettings

REQUESTS = 50
SETTINGS = ServerSettings(limits=Limits(queue_size=8))


def body(i: int) -> dict:
    return {"prompt": f"request {i}", "seed": 1000 + i, "steps": 1, "width": 64, "height": 64}


async def burst(url: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=REQUESTS)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(
            *(client.post("/sdapi/v1/txt2img", json=body(i)) for i in range(REQUESTS))
        )


def check_answers(responses: list[httpx.Response]) -> int:
    """Each answer is this request's image or a 429; returns the number of images."""
    images = 0
    for i, response in enumerate(responses):
        if response.status_code == 429:
            assert int(response.headers["Retry-After"]) >= 1
            assert "queue is full" in response.json()["detail"]
            continue
        assert response.status_code == 200, response.text
        data = response.json()
        info = json.loads(data["info"])
        assert (info["prompt"], info["all_seeds"]) == (f"request {i}", [1000 + i])
        [b64] = data["images"]
        image = Image.open(io.BytesIO(base64.b64decode(b64)))
        assert image.size == (64, 64) and image.info["parameters"].startswith(f"request {i}\n")
        assert f"Seed: {1000 + i}," in image.info["parameters"]
        images += 1
    return images


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_burst_on_a_busy_worker_fills_the_queue_and_the_rest_get_429(tiny_pipe, start_server):
    with start_server(tiny_pipe, SETTINGS) as server:
        queue, gate = server.state.queue, threading.Event()
        blocker = Job(work=lambda callback: [] if gate.wait(60) else None, steps=1)
        queue.submit(blocker)  # holds the worker while the burst arrives
        deadline = time.monotonic() + 30
        while queue.running is not blocker and time.monotonic() < deadline:
            time.sleep(0.01)
        responses: list[httpx.Response] = []
        client = threading.Thread(target=lambda: responses.extend(asyncio.run(burst(server.url))))
        client.start()
        while queue.stats()["rejected"] < REQUESTS - 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            health = httpx.get(server.url + "/health", timeout=10).json()  # answers under load
        finally:
            gate.set()
        client.join(60)
        assert health["queue"]["waiting"] == 8 and health["queue"]["rejected"] == REQUESTS - 8
        assert check_answers(responses) == 8
        stats = queue.stats()
        assert (stats["submitted"], stats["completed"], stats["waiting"], stats["running"]) == (9, 9, 0, 0)


def test_repeated_bursts_lose_nothing_and_memory_stays_bounded(tiny_pipe, start_server):
    with start_server(tiny_pipe, SETTINGS) as server:
        queue = server.state.queue
        served, sizes = 0, []
        for _ in range(3):
            served += check_answers(asyncio.run(burst(server.url)))
            sizes.append(rss_bytes())
            assert httpx.get(server.url + "/health", timeout=10).json()["status"] == "ok"
        stats = queue.stats()
        assert stats["completed"] == stats["submitted"] == served >= 9
        assert stats["rejected"] == 3 * REQUESTS - served
        assert (stats["waiting"], stats["running"], stats["failed"]) == (0, 0, 0)
        growth = sizes[-1] - sizes[0]
        assert growth < 64 * 2**20, f"resident memory grew by {growth / 2**20:.0f} MiB over two bursts"
