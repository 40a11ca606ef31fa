"""Interrupted OpenAI jobs (the web page's or /sdapi/v1/interrupt's Interrupt) answer the estimate they
reached with the PNG info the AUTOMATIC1111 routes write: the steps reached and "Interrupted at step";
prompt-editing syntax is honoured and recorded as sent."""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the OpenAI client test needs the 'openai' package")

SLOW = {"seed": 1, "steps": 150}


def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="not-needed", max_retries=0, timeout=60)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def interrupted(server, call):
    """Run ``call`` in a thread, interrupt it after its second step, and return what it answered."""
    results = {}
    thread = threading.Thread(target=lambda: results.update(r=call()))
    thread.start()
    deadline = time.monotonic() + 30
    while server.state.queue.running is None or server.state.queue.running.step < 2:
        assert time.monotonic() < deadline and thread.is_alive()
        time.sleep(0.02)
    assert httpx.post(server.url + "/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    return results["r"]


def check_reached(text: str) -> None:
    reached = int(text.split("Interrupted at step: ")[1].split("/")[0])
    assert (
        2 <= reached < 150 and f"Steps: {reached}," in text and f"Interrupted at step: {reached}/150" in text
    )


def test_an_interrupted_generation_records_the_steps_it_reached(server):
    prompt = "[a red:a blue:0.5] square AND a circle :0.5"
    response = interrupted(
        server,
        lambda: client(server).images.generate(
            prompt=prompt, size="128x128", response_format="b64_json", extra_body=SLOW
        ),
    )
    text = decode(response.data[0].b64_json).info["parameters"]
    assert text.startswith(prompt + "\n")
    check_reached(text)


def test_an_interrupted_stream_and_edit_record_the_steps_they_reached(server, picture, to_png):
    def stream():
        events = client(server).images.generate(
            prompt="x", size="128x128", stream=True, partial_images=0, extra_body=SLOW
        )
        return [event for event in events]

    events = interrupted(server, stream)
    assert [event.type for event in events] == ["image_generation.completed"]
    check_reached(decode(events[0].b64_json).info["parameters"])
    edit = interrupted(
        server,
        lambda: client(server).images.edit(
            image=("in.png", to_png(picture.resize((128, 128))), "image/png"),
            prompt="a blue square",
            extra_body={**SLOW, "strength": 1.0},
        ),
    )
    text = decode(edit.data[0].b64_json).info["parameters"]
    check_reached(text)
    assert "Denoising strength: 1.0" in text
