"""SDXL models in the server with no special flags: tiny random SDXL base and refiner models saved in
the native format and loaded as ``ldm serve --model`` would, driven with httpx (/sdapi/v1) and the
official ``openai`` client. Unset sizes are the model's, the listing names the family, and SDXL's
micro-conditioning (diffusers' names, as extension fields of the web UI's payloads) reaches the image."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from PIL import Image, ImageChops

import latentdiffusion as ld

SIZE = 32  # conftest's SDXL_SIZE: unset sizes must be this, not SD's 512 or the tiny SD model's 64
MICRO = {
    "original_size": [512, 384],
    "crops_coords_top_left": [16, 0],
    "target_size": [32, 32],  # the output's own size: the same image as unset, but reported as given
    "negative_original_size": [64, 64],
}


@pytest.fixture
def http(sdxl_server):
    with httpx.Client(base_url=sdxl_server.url, timeout=60) as client:
        yield client


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def differ(a: Image.Image, b: Image.Image) -> bool:
    return ImageChops.difference(a.convert("RGB"), b.convert("RGB")).getbbox() is not None


def test_unset_sizes_are_the_models_and_the_family_is_reported(sdxl_server, http):
    health = http.get("/health").json()
    assert health["family"] == "sdxl" and health["defaults"]["size"] == SIZE
    assert health["defaults"]["size_multiple"] == 8
    data = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 1}).json()
    assert decode(data["images"][0]).size == (SIZE, SIZE)
    [model] = http.get("/sdapi/v1/sd-models").json()
    assert (model["model_name"], model["family"]) == ("tiny-sdxl", "sdxl")
    assert model["title"] == f"tiny-sdxl [{model['hash']}]"  # hashed (web UI style) once loaded for a job
    assert model["filename"] == sdxl_server.state.settings.model_source and model["sample_size"] == SIZE
    assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == model["title"]


def test_txt2img_with_and_without_micro_conditioning(http):
    body = {"prompt": "a red circle", "negative_prompt": "blue", "steps": 2, "seed": 3, "batch_size": 2}
    plain = http.post("/sdapi/v1/txt2img", json=body).json()
    assert json.loads(plain["info"])["extra_generation_params"] == {}
    micro = http.post("/sdapi/v1/txt2img", json={**body, **MICRO}).json()
    info = json.loads(micro["info"])
    assert info["extra_generation_params"] == MICRO
    assert {k: micro["parameters"][k] for k in MICRO} == MICRO  # echoed as sent
    for before, after in zip(plain["images"], micro["images"], strict=True):
        assert decode(after).size == (SIZE, SIZE)
        assert differ(decode(before), decode(after))  # the conditioning reached the U-Net
    same = http.post("/sdapi/v1/txt2img", json={**body, "target_size": [SIZE, SIZE]}).json()
    assert same["images"] == plain["images"]  # the default stated explicitly changes nothing


def test_img2img_with_and_without_micro_conditioning(http, picture):
    body = {"init_images": [b64png(picture.resize((48, 32)))], "prompt": "x", "steps": 2, "seed": 1}
    plain = http.post("/sdapi/v1/img2img", json=body).json()
    micro = http.post("/sdapi/v1/img2img", json={**body, "original_size": [1024, 1024]}).json()
    assert decode(plain["images"][0]).size == decode(micro["images"][0]).size == (48, 32)
    assert differ(decode(plain["images"][0]), decode(micro["images"][0]))
    assert json.loads(micro["info"])["extra_generation_params"] == {"original_size": [1024, 1024]}
    assert "Denoising strength: 0.75" in json.loads(micro["info"])["infotexts"][0]


def test_openai_generation_and_its_refusal_of_micro_conditioning(sdxl_server):
    openai = pytest.importorskip("openai", reason="the OpenAI client test needs the 'openai' package")
    client = openai.OpenAI(base_url=f"{sdxl_server.url}/v1", api_key="x", max_retries=0, timeout=60)
    response = client.images.generate(prompt="a square", n=2, size="48x32", extra_body={"steps": 1})
    images = [decode(item.b64_json) for item in response.data]
    assert [image.size for image in images] == [(48, 32)] * 2
    assert "Model: tiny-sdxl" in images[0].info["parameters"]
    auto = client.images.generate(prompt="a square", size="auto", extra_body={"steps": 1})
    assert decode(auto.data[0].b64_json).size == (SIZE, SIZE)
    with pytest.raises(openai.UnprocessableEntityError, match="accepted by /sdapi/v1/txt2img") as error:
        client.images.generate(prompt="x", extra_body={"original_size": [512, 512]})
    assert error.value.body["message"].startswith("body: original_size: SDXL micro-conditioning")
    with pytest.raises(openai.UnprocessableEntityError, match="size width: must be a positive multiple of 8"):
        client.images.generate(prompt="x", size="36x32")


BAD = [
    ({"original_size": [0, 64]}, "original_size must be two whole numbers in [1, 65536], got [0, 64]"),
    ({"original_size": [64]}, "original_size must be two whole numbers"),
    ({"target_size": "64x64"}, "target_size must be two whole numbers in [1, 65536], got '64x64'"),
    ({"negative_target_size": [64.5, 64]}, "negative_target_size must be two whole numbers"),
    ({"crops_coords_top_left": [-1, 0]}, "crops_coords_top_left must be two whole numbers in [0, 65536]"),
    ({"negative_crops_coords_top_left": [True, 0]}, "negative_crops_coords_top_left must be two"),
    ({"negative_original_size": [10**6, 1]}, "negative_original_size must be two whole numbers"),
    ({"aesthetic_score": "high"}, "aesthetic_score must be a finite number, got 'high'"),
    ({"negative_aesthetic_score": True}, "negative_aesthetic_score must be a finite number, got True"),
]


@pytest.mark.parametrize(("fields", "message"), BAD)
def test_bad_micro_conditioning_is_a_422_with_one_message(sdxl_server, http, fields, message):
    submitted = sdxl_server.state.queue.stats()["submitted"]
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, **fields})
    assert response.status_code == 422
    assert response.json() == {"detail": response.json()["detail"]} and message in response.json()["detail"]
    assert ";" not in response.json()["detail"]  # one message, not a list of pydantic errors
    assert sdxl_server.state.queue.stats()["submitted"] == submitted  # refused before queueing


def test_bad_values_on_img2img_and_sizes_off_the_multiple(http):
    nan = '{"init_images": ["x"], "aesthetic_score": NaN}'
    response = http.post("/sdapi/v1/img2img", content=nan, headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"] == "aesthetic_score must be a finite number, got nan"
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 36})
    assert response.status_code == 422
    assert response.json()["detail"] == "width: must be a positive multiple of 8, got 36"


def test_the_refiner_takes_aesthetic_scores(sdxl_model, start_server, picture):
    pipe = ld.load(str(sdxl_model("refiner")))
    with start_server(pipe) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        [model] = http.get("/sdapi/v1/sd-models").json()
        assert model["family"] == "sdxl-refiner"
        body = {"init_images": [b64png(picture.resize((SIZE, SIZE)))], "steps": 2, "denoising_strength": 0.5}
        plain = http.post("/sdapi/v1/img2img", json=body).json()
        scored = http.post("/sdapi/v1/img2img", json={**body, "aesthetic_score": 9.5}).json()
        assert differ(decode(plain["images"][0]), decode(scored["images"][0]))
        assert json.loads(scored["info"])["extra_generation_params"] == {"aesthetic_score": 9.5}
        assert scored["parameters"]["aesthetic_score"] == 9.5
