"""The OpenAI routes on a server of several models (``ldm serve --model-dir``), driven by the official
``openai`` client: ``/v1/models`` lists them all, and a request's ``model`` switches to the one it names."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.components import build_components
from latentdiffusion.config import get_preset
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.serving.settings import ServerSettings

from .conftest import TEST_LIMITS

openai = pytest.importorskip("openai", reason="the OpenAI client test needs the 'openai' package")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    """Two different tiny models: a single file and a native folder."""
    folder = tmp_path_factory.mktemp("openai-models")
    Pipeline(build_components(get_preset("tiny"), seed=1)).save(folder / "one.safetensors", "single-file")
    Pipeline(build_components(get_preset("tiny"), seed=2)).save(folder / "two")
    return folder


@pytest.fixture(scope="module")
def served(models_dir):
    from .conftest import running_server

    source = str(models_dir / "one.safetensors")
    settings = ServerSettings(limits=TEST_LIMITS, model_source=source, model_dir=models_dir, loader=ld.load)
    with running_server(ld.load(source), settings) as server:
        yield server


def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=60)


def pixels(server, **ask) -> bytes:
    response = client(server).images.generate(
        prompt="a red circle", response_format="b64_json", extra_body={"seed": 1, "steps": 2}, **ask
    )
    return Image.open(io.BytesIO(base64.b64decode(response.data[0].b64_json))).convert("RGB").tobytes()


def checkpoint(server) -> str:
    return httpx.get(server.url + "/sdapi/v1/options").json()["sd_model_checkpoint"]


def test_models_lists_every_served_model(served, models_dir):
    listed = {m.id: m for m in client(served).models.list()}
    assert set(listed) == {"one", "two"}
    assert listed["one"].created == int((models_dir / "one.safetensors").stat().st_mtime)
    assert client(served).models.retrieve("two").id == "two"
    with pytest.raises(openai.NotFoundError):
        client(served).models.retrieve("three")


def test_a_request_naming_a_served_model_switches_to_it(served):
    one = pixels(served, model="one")
    two = pixels(served, model="two")
    assert one != two and checkpoint(served).startswith("two")
    assert pixels(served, model="gpt-image-1") == two  # OpenAI's own names: the model in memory
    assert pixels(served) == two
    assert pixels(served, model="one") == one and checkpoint(served).startswith("one")


def test_a_single_model_server_ignores_other_names(server):
    name = server.state.pipe.components.name
    ids = [m.id for m in client(server).models.list()]
    assert ids == [name]
    assert pixels(server, model="dall-e-3") == pixels(server, model=name)
