"""Bad input answers 4xx with a message that names the problem, never 500, and the server keeps serving."""

from __future__ import annotations

import base64

import httpx
import pytest

from latentdiffusion.serving.settings import Limits, ServerSettings

NOT_AN_IMAGE = base64.b64encode(b"hello, not an image").decode()
TXT2IMG, IMG2IMG, GENERATIONS, EDITS = (
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/v1/images/generations",
    "/v1/images/edits",
)


def raw(text: str) -> dict:
    return {"content": text, "headers": {"Content-Type": "application/json"}}


CASES = [
    (TXT2IMG, raw("{bad json"), 400, "body: not valid JSON"),
    (TXT2IMG, raw("[1, 2]"), 422, "valid dictionary"),
    (TXT2IMG, raw(""), 422, "body"),
    (TXT2IMG, {"json": {"prompt": 5}}, 422, "prompt: Input should be a valid string"),
    (TXT2IMG, {"json": {"steps": "many"}}, 422, "steps: Input should be a valid integer"),
    (TXT2IMG, {"json": {"steps": 2.5}}, 422, "steps:"),
    (TXT2IMG, {"json": {"width": -64}}, 422, "width: Input should be greater than or equal to 1"),
    (TXT2IMG, {"json": {"width": 60}}, 422, "width: must be a positive multiple of 8"),
    (TXT2IMG, {"json": {"height": 10**9}}, 422, "height: must be at most 256"),
    (TXT2IMG, {"json": {"steps": 10**6}}, 422, "steps: must be at most 150"),
    (TXT2IMG, {"json": {"batch_size": 3, "n_iter": 2}}, 422, "batch_size * n_iter: must be at most 4"),
    (TXT2IMG, {"json": {"seed": -7}}, 422, "seed:"),
    (TXT2IMG, {"json": {"seed": 2**40}}, 422, "seed:"),
    (TXT2IMG, raw('{"cfg_scale": NaN}'), 422, "cfg_scale:"),
    (
        TXT2IMG,
        {"json": {"sampler_name": "DPM adaptive"}},
        422,
        "sampler_name: unknown sampler 'DPM adaptive'",
    ),
    (TXT2IMG, {"json": {"scheduler": "polyexponential"}}, 422, "scheduler: unknown scheduler"),
    (TXT2IMG, {"json": {"prompt": "x" * 5000}}, 422, "prompt: is 5000 characters long"),
    (IMG2IMG, {"json": {"prompt": "x"}}, 422, "init_images: Field required"),
    (IMG2IMG, {"json": {"init_images": []}}, 422, "init_images: List should have at least 1 item"),
    (IMG2IMG, {"json": {"init_images": [NOT_AN_IMAGE]}}, 422, "init_images: is not a readable image"),
    (IMG2IMG, {"json": {"init_images": ["%%%"]}}, 422, "init_images:"),
    (IMG2IMG, {"json": {"init_images": [NOT_AN_IMAGE], "denoising_strength": 2}}, 422, "denoising_strength:"),
    (GENERATIONS, {"json": {}}, 422, "prompt: Field required"),
    (GENERATIONS, {"json": {"prompt": "x", "n": 0}}, 422, "n: Input should be greater than or equal to 1"),
    (GENERATIONS, {"json": {"prompt": "x", "n": 50}}, 422, "n: must be at most 4"),
    (GENERATIONS, {"json": {"prompt": "x", "size": "big"}}, 422, "size: expected WIDTHxHEIGHT"),
    (GENERATIONS, {"json": {"prompt": "x", "size": "-64x64"}}, 422, "size: expected WIDTHxHEIGHT"),
    (GENERATIONS, {"json": {"prompt": "x", "response_format": "gif"}}, 422, "response_format:"),
    (EDITS, {"data": {"prompt": "x"}}, 422, "image: is required as a file"),
    (
        EDITS,
        {"data": {"prompt": "x"}, "files": {"image": ("a.txt", b"text", "text/plain")}},
        422,
        "not a readable",
    ),
    (
        EDITS,
        {"data": {"prompt": "x", "n": "two"}, "files": {"image": ("a.png", b"x")}},
        422,
        "n: Input should be",
    ),
    (EDITS, {"json": {"prompt": "x"}}, 422, "image: is required as a file"),
    (
        EDITS,
        {"data": {"prompt": "x", "crops_coords_top_left": "0,0"}, "files": {"image": ("a.png", b"x")}},
        422,
        "crops_coords_top_left: SDXL micro-conditioning is accepted by /sdapi/v1/txt2img",
    ),
    (TXT2IMG, {"json": {"original_size": [0, 64]}}, 422, "original_size must be two whole numbers"),
    (EDITS, raw("--broken multipart") | {"headers": {"Content-Type": "multipart/form-data"}}, 400, ""),
]


@pytest.mark.parametrize(("path", "request_args", "status", "message"), CASES)
def test_bad_input_is_a_4xx_with_a_message(server, path, request_args, status, message):
    response = httpx.post(server.url + path, timeout=30, **request_args)
    assert response.status_code == status, response.text
    body = response.json()
    text = body["error"]["message"] if path.startswith("/v1/") else body["detail"]
    assert isinstance(text, str) and message in text
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_the_server_still_serves_after_bad_input(server):
    response = httpx.post(server.url + TXT2IMG, json={"prompt": "fine", "steps": 1}, timeout=30)
    assert response.status_code == 200 and len(response.json()["images"]) == 1
    assert server.state.queue.stats()["failed"] == 0  # nothing bad reached the model


def test_api_key_and_body_limit(tiny_pipe, start_server):
    settings = ServerSettings(limits=Limits(max_body_bytes=2000), api_key="s3cret")
    with start_server(tiny_pipe, settings) as server:
        url = server.url + TXT2IMG
        good = {"prompt": "x", "steps": 1}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            response = httpx.post(url, json=good, headers=headers, timeout=30)
            assert response.status_code == 401 and "API key" in response.json()["detail"]
            assert response.headers["WWW-Authenticate"] == "Bearer"
        openai_style = httpx.post(server.url + GENERATIONS, json={"prompt": "x"}, timeout=30)
        assert (
            openai_style.status_code == 401 and openai_style.json()["error"]["type"] == "authentication_error"
        )
        # without the key even a malformed body is refused as unauthorised, before it is looked at
        assert httpx.post(url, **raw("{bad"), timeout=30).status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.post(url, json=good, headers=key, timeout=30).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # open: for monitors
        assert httpx.get(server.url + "/").status_code == 200  # the page asks for the key itself
        big = httpx.post(url, json={"prompt": "x" * 3000}, headers=key, timeout=30)
        assert big.status_code == 413 and "larger than 2000 bytes" in big.json()["detail"]

        def chunks():
            yield b'{"prompt": "'
            yield b"x" * 3000
            yield b'"}'

        chunked = httpx.post(
            url, content=chunks(), headers={**key, "Content-Type": "application/json"}, timeout=30
        )
        assert chunked.status_code == 413
