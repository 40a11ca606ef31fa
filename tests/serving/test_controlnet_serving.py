"""The AUTOMATIC1111 ControlNet extension's HTTP API: ``alwayson_scripts.controlnet.args`` units in
txt2img/img2img, and its ``/controlnet/*`` routes, over a ``--controlnet-dir`` holding a tiny random
diffusers ControlNet for the tiny model (and a corrupt file)."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

import latentdiffusion as ld
from latentdiffusion.pipelines.metadata import parse_parameters
from latentdiffusion.serving.settings import Limits, ServerSettings

from .conftest import TEST_LIMITS, write_tiny_controlnet

cv2 = pytest.importorskip("cv2")
SIZE = 64


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory):
    """tinycn/ (a diffusers ControlNet folder for preset:tiny, random zero convolutions) and broken.pth."""
    folder = tmp_path_factory.mktemp("controlnets")
    write_tiny_controlnet(folder)
    (folder / "broken.pth").write_bytes(b"not a checkpoint")
    (folder / "notes.txt").write_text("not a model")
    return folder


@pytest.fixture(scope="module")
def cn_server(tiny_pipe, controlnet_dir):
    from .conftest import running_server

    with running_server(
        tiny_pipe, ServerSettings(limits=TEST_LIMITS, controlnet_dir=controlnet_dir)
    ) as server:
        yield server


@pytest.fixture
def http(cn_server):
    with httpx.Client(base_url=cn_server.url, timeout=60) as client:
        yield client


def web_hash(path) -> str:
    """The web UI's short hash, computed here: SHA-256 of the 64 KiB at offset 1 MiB, 8 hex digits."""
    data = path.read_bytes()
    return hashlib.sha256(data[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]


def drawing() -> Image.Image:
    image = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(image)
    draw.ellipse((8, 8, 40, 44), fill=(220, 40, 40))
    draw.rectangle((36, 20, 60, 60), fill=(40, 80, 220))
    return image


def b64png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def txt2img(http, *units, **fields):
    body = {"prompt": "a red circle", "seed": 5, "steps": 2, "width": SIZE, "height": SIZE, **fields}
    if units:
        body["alwayson_scripts"] = {"ControlNet": {"args": list(units)}}
    return http.post("/sdapi/v1/txt2img", json=body)


def title(controlnet_dir) -> str:
    return f"tinycn [{web_hash(controlnet_dir / 'tinycn' / 'diffusion_pytorch_model.safetensors')}]"


def test_version_model_and_module_lists(http, controlnet_dir):
    assert http.get("/controlnet/version").json() == {"version": 3}
    models = http.get("/controlnet/model_list").json()["model_list"]
    assert models == [f"broken [{web_hash(controlnet_dir / 'broken.pth')}]", title(controlnet_dir)]
    modules = http.get("/controlnet/module_list").json()
    assert modules["module_list"][:2] == ["none", "canny"] and "seg_shapes" in modules["module_list"]
    canny = modules["module_detail"]["canny"]["sliders"]
    assert [s["name"] for s in canny] == ["Resolution", "Low Threshold", "High Threshold"]
    assert http.get("/controlnet/settings").json() == {
        "control_net_unit_count": TEST_LIMITS.max_control_units
    }


def test_detect_is_the_preprocessor(http):
    body = {
        "controlnet_module": "canny",
        "controlnet_input_images": [b64png(drawing())],
        "controlnet_threshold_a": 50,
        "controlnet_threshold_b": 120,
    }
    data = http.post("/controlnet/detect", json=body).json()
    edges = np.asarray(decode(data["images"][0]))
    assert data["info"] == "Success"
    assert np.array_equal(edges[:, :, 0], cv2.Canny(np.asarray(drawing()), 50, 120))


def test_txt2img_unit_equals_the_python_api(http, tiny_pipe, controlnet_dir):
    unit = {
        "enabled": True,
        "module": "canny",
        "model": "TinyCN",  # the name, any case, works as well as the title
        "image": b64png(drawing()),
        "weight": 1.5,
        "guidance_end": 0.5,
        "control_mode": 2,
        "resize_mode": "Just Resize",
        "threshold_a": 60,
        "threshold_b": 160,
    }
    response = txt2img(http, unit)
    assert response.status_code == 200, response.text
    served = decode(response.json()["images"][0])
    control = ld.Control(
        str(controlnet_dir / "tinycn"),
        drawing(),
        strength=1.5,
        end=0.5,
        control_mode="ControlNet is more important",
        resize_mode="Just Resize",
        preprocessor="canny",
        low_threshold=60,
        high_threshold=160,
    )
    options = dict(seed=5, steps=2, width=SIZE, height=SIZE)
    expected = tiny_pipe.generate("a red circle", control=[control], **options)[0]
    assert np.array_equal(np.asarray(served), np.asarray(expected))
    plain = decode(txt2img(http).json()["images"][0])
    assert np.abs(np.asarray(plain, float) - np.asarray(served, float)).max() > 2
    settings = parse_parameters(served.info["parameters"])["settings"]
    assert settings["ControlNet 0"] == (
        f"Module: canny, Model: {title(controlnet_dir)}, Weight: 1.5, Resize Mode: Just Resize, "
        "Threshold A: 60, Threshold B: 160, Guidance Start: 0, Guidance End: 0.5, Pixel Perfect: False, "
        "Control Mode: ControlNet is more important"
    )
    disabled = txt2img(http, {**unit, "enabled": False}).json()["images"][0]
    assert np.array_equal(np.asarray(decode(disabled)), np.asarray(plain))


def test_img2img_unit_without_image_uses_the_init_image(http, controlnet_dir):
    body = {
        "init_images": [b64png(drawing())],
        "prompt": "a cat",
        "seed": 3,
        "steps": 2,
        "denoising_strength": 0.8,
    }
    unit = {"module": "invert", "model": title(controlnet_dir)}
    without_image = http.post(
        "/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    )
    with_image = {**unit, "image": b64png(drawing())}
    explicit = http.post(
        "/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"controlnet": {"args": [with_image]}}}
    )
    assert without_image.status_code == explicit.status_code == 200, without_image.text
    assert without_image.json()["images"] == explicit.json()["images"]


def test_inpaint_unit_takes_the_request_mask(http, controlnet_dir):
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 48))
    body = {
        "init_images": [b64png(drawing())],
        "mask": b64png(mask),
        "inpaint_full_res": False,
        "prompt": "a cat",
        "seed": 3,
        "steps": 2,
        "alwayson_scripts": {"controlnet": {"args": [{"module": "inpaint_only", "model": "tinycn"}]}},
    }
    response = http.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    assert "Module: inpaint_only" in json.loads(response.json()["info"])["infotexts"][0]


@pytest.mark.parametrize(
    ("unit", "field", "message"),
    [
        (
            {"model": "nothing"},
            "args[0].model",
            "unknown ControlNet 'nothing'; known (GET /controlnet/model_list)",
        ),
        ({"module": "depth_midas"}, "args[0].module", "must be supplied"),
        ({"weight": 3}, "args.0.weight", "less than or equal to 2"),
        ({"control_mode": "loud"}, "args[0]", "unknown control mode 'loud'"),
        ({"resize_mode": 7}, "args[0]", "unknown resize mode 7"),
        ({"guidance_start": 0.6, "guidance_end": 0.4}, "args[0]", "start < end"),
        ({"image": None}, "args[0].image", "is required"),
        ({"image": "@@@"}, "args[0].image", "send an image file"),
        ({"module": "blur_gaussian", "threshold_a": 100}, "args[0]", "Sigma"),
        ({"model": "broken"}, "", "broken"),  # a corrupt file: the loader's one-line error
    ],
)
def test_bad_units_are_one_clear_422(http, controlnet_dir, unit, field, message):
    base = {"module": "canny", "model": "tinycn", "image": b64png(drawing())}
    response = txt2img(http, {**base, **unit})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert field in detail and message in detail, detail


def test_too_many_units(http):
    unit = {"module": "canny", "model": "tinycn", "image": b64png(drawing())}
    response = txt2img(http, *[unit] * (TEST_LIMITS.max_control_units + 1))
    assert response.status_code == 422 and "at most" in response.json()["detail"]


def test_detect_errors(http):
    for body, message in [
        ({"controlnet_module": "openpose", "controlnet_input_images": [b64png(drawing())]}, "known: none"),
        ({"controlnet_module": "canny"}, "no image given"),
        ({"controlnet_module": "inpaint", "controlnet_input_images": [b64png(drawing())]}, "one mask per"),
    ]:
        response = http.post("/controlnet/detect", json=body)
        assert response.status_code == 422 and message in response.json()["detail"], response.text


def test_a_server_without_controlnets_says_how_to_get_them(tiny_pipe, start_server):
    with start_server(tiny_pipe, ServerSettings(limits=TEST_LIMITS, api_key="k")) as server:
        with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": "Bearer k"}) as http:
            assert http.get("/controlnet/model_list").json() == {"model_list": []}
            unit = {"module": "canny", "model": "tinycn", "image": b64png(drawing())}
            response = txt2img(http, unit)
            assert response.status_code == 422 and "--controlnet-dir" in response.json()["detail"]
        assert httpx.get(f"{server.url}/controlnet/model_list").status_code == 401  # the API key guards it


def test_unit_limit_is_a_setting():
    assert Limits().max_control_units == 4
