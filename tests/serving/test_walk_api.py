"""``POST /v1/videos/walks``: a walk on the tiny model as a video whose end frames are the stills, progress
over the whole walk, an interrupt answering the frames so far, and refused requests."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image, ImageSequence


def post(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/videos/walks", json=body, timeout=120)


def frames_of(answer: dict) -> list[Image.Image]:
    clip = Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"])))
    return [frame.convert("RGB") for frame in ImageSequence.Iterator(clip)]


def test_a_walk_is_one_video_ending_on_the_stills(server, tiny_pipe):
    body = {"prompts": ["a red circle", "a blue square"], "seeds": [3, 8], "frames": 2, "steps": 2}
    response = post(server, **body, size="32x32", format="apng")
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["frames"], answer["seeds"], answer["size"], answer["interrupted"]) == (
        3,
        [3, 8],
        "32x32",
        False,
    )
    frames = frames_of(answer)
    assert len(frames) == 3 and frames[0].size == (32, 32)
    for prompt, seed, frame in (("a red circle", 3, frames[0]), ("a blue square", 8, frames[2])):
        (still,) = tiny_pipe.generate(prompt, seed=seed, steps=2, width=32, height=32)
        assert np.array_equal(np.asarray(frame), np.asarray(still))  # APNG is lossless


def test_an_interrupted_walk_answers_the_frames_so_far(server):
    results = {}

    def call() -> None:
        results["r"] = post(server, prompts=["x", "y"], seeds=[1, 2], frames=3, steps=40, size="32x32")

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 60
    queue = server.state.queue
    while queue.running is None or queue.running.step < 45:  # into the second frame
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    assert queue.running.steps == 4 * 40  # progress counts the whole walk's steps
    assert httpx.post(server.url + "/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    answer = results["r"].json()
    assert results["r"].status_code == 200 and answer["interrupted"] is True
    assert answer["frames"] in (2, 3)  # the first frame and the estimate of the one in progress (or the next)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompts": ["a"]}, "at least two keyframes"),
        ({"seeds": [1, 2, 3]}, "one seed per prompt"),
        ({"frames": 40, "prompts": ["a", "b", "c"], "seeds": [1]}, "the walk would have 81 frames"),
        ({"size": "1000x64"}, "size width"),
        ({"format": "avi"}, "format"),
        ({"seeds": [-2]}, "seeds"),
    ],
)
def test_bad_walks_are_refused_by_field(server, body, field):
    response = post(server, **{"prompts": ["a", "b"], "steps": 1, **body})
    assert 400 <= response.status_code < 500
    assert field in response.text
