"""SD3 models in the server with no special flags: a tiny random SD3 model saved as a single file and
loaded as ``ldm serve --model`` would, driven with httpx (/sdapi/v1 txt2img and img2img) and the official
``openai`` client; unset sizes are the model's, sizes are multiples of 16 where the model says so."""

from __future__ import annotations

import base64
import io
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "families"))

from sd3_fixtures import SIZE, TINY_SD3

from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.components import build_components
from latentdiffusion.serving.settings import ServerSettings

from .conftest import TEST_LIMITS, running_server


@pytest.fixture(scope="module")
def sd3_server(tmp_path_factory):
    import latentdiffusion as ld

    path = tmp_path_factory.mktemp("sd3-serve") / "tiny-sd3.safetensors"
    save_components(build_components(TINY_SD3), path, "single-file")
    settings = ServerSettings(limits=TEST_LIMITS, model_source=str(path))
    with running_server(ld.load(str(path)), settings) as running:
        yield running


@pytest.fixture
def http(sd3_server):
    with httpx.Client(base_url=sd3_server.url, timeout=60) as client:
        yield client


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_txt2img_and_img2img(http):
    assert http.get("/health").json()["family"] == "sd3"
    data = http.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "seed": 1}).json()
    image = decode(data["images"][0])
    assert image.size == (SIZE, SIZE)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    body = {
        "prompt": "a blue square",
        "init_images": [base64.b64encode(buffer.getvalue()).decode()],
        "denoising_strength": 0.5,
        "steps": 2,
    }
    assert decode(http.post("/sdapi/v1/img2img", json=body).json()["images"][0]).size == (SIZE, SIZE)


def test_a_size_off_the_grid_is_a_422(http):
    response = http.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 36, "height": 32})
    assert response.status_code == 422 and "multiple of 8" in response.text


def test_openai_images(sd3_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{sd3_server.url}/v1", api_key="unused")
    result = client.images.generate(
        prompt="a red circle", n=1, size=f"{SIZE}x{SIZE}", response_format="b64_json"
    )
    assert decode(result.data[0].b64_json).size == (SIZE, SIZE)
