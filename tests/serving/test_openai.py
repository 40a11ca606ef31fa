"""The OpenAI-compatible routes, driven by the official ``openai`` client with its base_url set."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

openai = pytest.importorskip("openai", reason="the OpenAI client test needs the 'openai' package")
SIZE = 64  # the tiny model's sample size


def client(server, api_key: str = "not-needed"):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_images_generate_returns_b64_png_with_parameters(server):
    response = client(server).images.generate(
        prompt="a red circle",
        n=2,
        size="64x48",
        response_format="b64_json",
        extra_body={"seed": 7, "steps": 2},
    )
    images = [decode(item.b64_json) for item in response.data]
    assert [image.size for image in images] == [(64, 48), (64, 48)]
    assert [image.format for image in images] == ["PNG", "PNG"]
    assert "Seed: 7" in images[0].info["parameters"] and "Seed: 8" in images[1].info["parameters"]
    assert images[0].info["parameters"].startswith("a red circle\n")
    assert response.size == "64x48" and response.created > 0


def test_same_seed_gives_the_same_image_and_auto_size_is_the_models(server):
    ask = dict(prompt="a square", response_format="b64_json", extra_body={"seed": 5, "steps": 1})
    first = client(server).images.generate(**ask, size="auto").data[0].b64_json
    second = client(server).images.generate(**ask).data[0].b64_json
    assert first == second
    assert decode(first).size == (SIZE, SIZE)


def test_url_response_format_gives_a_data_url_in_the_asked_format(server):
    response = client(server).images.generate(
        prompt="x", response_format="url", output_format="jpeg", extra_body={"steps": 1}
    )
    prefix = "data:image/jpeg;base64,"
    assert response.data[0].url.startswith(prefix) and response.output_format == "jpeg"
    assert decode(response.data[0].url.removeprefix(prefix)).format == "JPEG"


def test_images_edit_repaints_the_transparent_part_of_the_mask(server, picture, to_png):
    image = picture
    mask = Image.new("RGBA", image.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (24, 24, 40, 40))  # transparent: repaint
    response = client(server).images.edit(
        image=("in.png", to_png(image), "image/png"),
        mask=("mask.png", to_png(mask), "image/png"),
        prompt="a blue square",
        response_format="b64_json",
        extra_body={"seed": 1, "steps": 2},
    )
    out = decode(response.data[0].b64_json).convert("RGB")
    assert out.size == image.size
    assert out.getpixel((0, 0)) == image.getpixel((0, 0))  # far from the mask: the input's pixels
    assert out.getpixel((32, 32)) != image.getpixel((32, 32))
    assert "Denoising strength" in decode(response.data[0].b64_json).info["parameters"]


def test_errors_reach_the_client_as_openai_errors(server):
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client(server).images.generate(prompt="x", size="100000x64")
    assert error.value.body["param"] == "size width"
    assert "at most 256" in error.value.body["message"]
    with pytest.raises(openai.UnprocessableEntityError, match="not a readable image"):
        client(server).images.edit(image=("in.png", b"not an image", "image/png"), prompt="x")
