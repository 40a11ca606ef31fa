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


# ---- streaming (server-sent events as the client parses them)


def stream_events(stream) -> list:
    with stream:
        return list(stream)


def test_streamed_generation_sends_partial_images_then_the_completed_image(server):
    ask = dict(prompt="a red circle", size="64x48", extra_body={"seed": 3, "steps": 4})
    events = stream_events(client(server).images.generate(**ask, stream=True, partial_images=2))
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    partials = [decode(event.b64_json) for event in events[:2]]
    assert [image.size for image in partials] == [(64, 48), (64, 48)]
    assert partials[0].tobytes() != partials[1].tobytes()  # the estimate sharpens step by step
    final = events[-1]
    assert final.size == "64x48" and final.output_format == "png" and final.usage.total_tokens == 0
    image = decode(final.b64_json)
    assert image.size == (64, 48) and "Seed: 3" in image.info["parameters"]
    # the same image as without streaming
    plain = client(server).images.generate(**ask, response_format="b64_json").data[0].b64_json
    assert final.b64_json == plain


def test_streamed_batch_completes_each_image_in_seed_order_and_zero_partials_send_none(server):
    ask = dict(prompt="x", n=2, extra_body={"seed": 10, "steps": 2})
    events = stream_events(client(server).images.generate(**ask, stream=True, partial_images=0))
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    seeds = [decode(event.b64_json).info["parameters"].split("Seed: ")[1].split(",")[0] for event in events]
    assert seeds == ["10", "11"]


def test_fewer_steps_than_partial_images_send_fewer(server):
    events = stream_events(
        client(server).images.generate(prompt="x", stream=True, partial_images=3, extra_body={"steps": 2})
    )
    assert [event.type for event in events] == [
        "image_generation.partial_image",
        "image_generation.completed",
    ]


def test_streamed_edit_uses_the_edit_event_names(server, picture, to_png):
    events = stream_events(
        client(server).images.edit(
            image=("in.png", to_png(picture), "image/png"),
            prompt="a blue square",
            stream=True,
            partial_images=1,
            extra_body={"seed": 1, "steps": 3},
        )
    )
    assert [event.type for event in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert decode(events[-1].b64_json).size == picture.size


def test_bad_streaming_fields_are_refused_before_any_event(server):
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client(server).images.generate(prompt="x", stream=True, partial_images=4)
    assert error.value.body["param"] == "partial_images"


def test_partial_image_steps_are_spread_and_never_the_last():
    from latentdiffusion.serving.openai_stream import partial_steps

    assert partial_steps(20, 3) == {5, 10, 15}
    assert partial_steps(4, 2) == {2, 3}
    assert partial_steps(2, 3) == {1}
    assert partial_steps(1, 3) == set()
    assert partial_steps(20, 0) == set()


def test_a_failure_during_the_stream_is_an_openai_error_event():
    from latentdiffusion.errors import UserError
    from latentdiffusion.serving.openai_stream import error_event
    from latentdiffusion.serving.settings import FieldError

    assert error_event(FieldError("steps", "too many")) == {
        "error": {
            "message": "steps: too many",
            "type": "invalid_request_error",
            "param": "steps",
            "code": None,
        }
    }
    assert error_event(UserError("bad"))["error"]["param"] is None
    assert error_event(RuntimeError("x"))["error"]["type"] == "server_error"


# ---- models and variations


def test_models_lists_the_served_model(server):
    name = server.state.pipe.components.name
    assert [m.id for m in client(server).models.list()] == [name]
    model = client(server).models.retrieve(name)
    assert model.id == name and model.object == "model" and model.owned_by == "latentdiffusion"
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client(server).models.retrieve("dall-e-2")


def test_variations_are_img2img_at_the_default_strength(server, picture, to_png):
    source = picture.resize((64, 48))
    response = client(server).images.create_variation(
        image=("in.png", to_png(source), "image/png"), n=2, extra_body={"seed": 4, "steps": 4}
    )
    images = [decode(item.b64_json) for item in response.data]
    assert [image.size for image in images] == [(64, 48), (64, 48)]
    parameters = images[0].info["parameters"]
    assert "Denoising strength: 0.75" in parameters and "Seed: 4" in parameters
    assert "Mask blur" not in parameters
    # what the pipeline's img2img makes of the same input
    expected = server.state.pipe.img2img(source, "", steps=4, seed=4, num_images=2)
    assert images[1].convert("RGB").tobytes() == expected[1].tobytes()


# ---- the checks OpenAI applies to edits


def test_several_images_in_one_edit_are_refused(server, picture, to_png):
    png = ("in.png", to_png(picture), "image/png")
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client(server).images.edit(image=[png, png], prompt="x")
    assert error.value.body["param"] == "image" and "2 images" in error.value.body["message"]


def test_a_mask_of_another_size_is_refused(server, picture, to_png):
    mask = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    with pytest.raises(openai.UnprocessableEntityError) as error:
        client(server).images.edit(
            image=("in.png", to_png(picture), "image/png"),
            mask=("mask.png", to_png(mask), "image/png"),
            prompt="x",
        )
    body = error.value.body
    assert body["param"] == "mask" and body["type"] == "invalid_request_error"
    assert "32x32" in body["message"] and "64x64" in body["message"]


def test_an_edit_without_a_mask_writes_no_mask_settings(server, picture, to_png):
    response = client(server).images.edit(
        image=("in.png", to_png(picture), "image/png"), prompt="x", extra_body={"seed": 2, "steps": 4}
    )
    parameters = decode(response.data[0].b64_json).info["parameters"]
    assert "Denoising strength: 0.75" in parameters
    assert "Mask" not in parameters and "Masked content" not in parameters
    # an image with transparent pixels is inpainted there (OpenAI's convention)
    holed = picture.convert("RGBA")
    holed.paste((0, 0, 0, 0), (16, 16, 48, 48))
    response = client(server).images.edit(
        image=("in.png", to_png(holed), "image/png"), prompt="x", extra_body={"seed": 2, "steps": 2}
    )
    assert "Mask blur: 4" in decode(response.data[0].b64_json).info["parameters"]


# ---- metadata in JPEG and WebP


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_jpeg_and_webp_carry_the_parameters_where_automatic1111_writes_them(server, output_format):
    piexif = pytest.importorskip("piexif")
    from piexif import helper

    ask = dict(prompt="a red circle", response_format="b64_json", extra_body={"seed": 6, "steps": 2})
    png = decode(client(server).images.generate(**ask).data[0].b64_json)
    data = base64.b64decode(
        client(server).images.generate(**ask, output_format=output_format).data[0].b64_json
    )
    image = Image.open(io.BytesIO(data))
    assert image.format == output_format.upper()
    exif = piexif.load(data if output_format == "jpeg" else image.info["exif"])  # as the web UI reads it
    comment = exif["Exif"][piexif.ExifIFD.UserComment]
    assert comment.startswith(b"UNICODE\0")
    assert helper.UserComment.load(comment) == png.info["parameters"]
    sd_parsers = pytest.importorskip("sd_parsers")
    parsed = sd_parsers.ParserManager().parse(image)
    assert [prompt.value for prompt in parsed.prompts] == ["a red circle"]


def test_closing_the_stream_cancels_its_job(server):
    import time

    import httpx

    def cancelled() -> int:
        return httpx.get(server.url + "/health").json()["queue"]["cancelled"]

    before = cancelled()
    request = {"prompt": "slow", "size": "256x256", "stream": True, "partial_images": 3, "steps": 150}
    with httpx.stream("POST", server.url + "/v1/images/generations", json=request, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
    deadline = time.monotonic() + 20
    while cancelled() == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cancelled() == before + 1
    assert httpx.get(server.url + "/health").json()["queue"]["running"] == 0
