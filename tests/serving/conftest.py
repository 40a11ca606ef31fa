"""A real server on a free loopback port, in a thread of the test process, over the tiny random model.

``start_server(pipe, settings)`` (``running_server``) starts uvicorn with ``create_app`` (lifespan and
worker thread included) and stops it afterwards, checking that neither the server thread nor the
worker outlives it. ``sdxl_model(kind)`` saves a tiny random SDXL model ("base" or "refiner", the
configs of ``tests/families/sdxl_fixtures.py`` at ``SDXL_SIZE``) in the native format, as a user
would point ``ldm serve --model`` at; ``sdxl_server`` serves the base one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serving tests need the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="the serving tests need the 'serve' extra (fastapi, uvicorn)")

import torch
import uvicorn
from PIL import Image

from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.components import build_components
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.serving.app import create_app, server_config
from latentdiffusion.serving.common import ServerState
from latentdiffusion.serving.settings import Limits, ServerSettings

SIZE = 64  # the tiny model's sample size
SDXL_SIZE = 32  # the tiny SDXL models' sample size: neither SD's 512 nor the tiny model's 64
TEST_LIMITS = Limits(max_side=256, max_steps=150, max_images=4, queue_size=8)


@dataclass
class RunningServer:
    url: str
    state: ServerState


@contextlib.contextmanager
def running_server(pipe: Pipeline, settings: ServerSettings | None = None) -> Iterator[RunningServer]:
    app = create_app(pipe, settings or ServerSettings(limits=TEST_LIMITS))
    server = uvicorn.Server(
        server_config(app, "127.0.0.1", 0, log_level="warning", timeout_graceful_shutdown=2)
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "the server did not start"
    state = app.state.server
    try:
        yield RunningServer(f"http://127.0.0.1:{sock.getsockname()[1]}", state)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive(), "the server thread outlived the server"
        worker = state.queue._thread
        assert worker is None or not worker.is_alive(), "the worker thread outlived the server"


@pytest.fixture(scope="session")
def tiny_pipe() -> Pipeline:
    import latentdiffusion as ld

    return ld.load("preset:tiny")


@pytest.fixture(scope="module")
def server(tiny_pipe: Pipeline) -> Iterator[RunningServer]:
    with running_server(tiny_pipe) as running:
        yield running


def sdxl_configs() -> dict:
    """The families' tiny SDXL configs (``tests/families/sdxl_fixtures.py``), loaded by path."""
    path = Path(__file__).parents[1] / "families" / "sdxl_fixtures.py"
    spec = importlib.util.spec_from_file_location("serving_sdxl_fixtures", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {"base": module.TINY_SDXL, "refiner": module.TINY_REFINER}


@pytest.fixture(scope="session")
def sdxl_model(tmp_path_factory):
    """``sdxl_model(kind)`` -> the folder of a tiny random SDXL model saved in the native format."""
    saved: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in saved:
            config = replace(sdxl_configs()[kind], sample_size=SDXL_SIZE)
            saved[kind] = tmp_path_factory.mktemp("models") / config.name
            save_native(build_components(config), saved[kind])
        return saved[kind]

    return get


@pytest.fixture(scope="module")
def sdxl_server(sdxl_model) -> Iterator[RunningServer]:
    import latentdiffusion as ld

    path = sdxl_model("base")
    settings = ServerSettings(limits=TEST_LIMITS, model_source=str(path))
    with running_server(ld.load(str(path)), settings) as running:
        yield running


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def gradient(size: tuple[int, int] = (SIZE, SIZE)) -> Image.Image:
    """A small picture with structure: a colour gradient."""
    width, height = size
    image = Image.new("RGB", size)
    image.putdata([(255 * x // width, 255 * y // height, 128) for y in range(height) for x in range(width)])
    return image


def write_tiny_controlnet(folder: Path) -> Path:
    """``folder/tinycn``: a diffusers ControlNet folder for preset:tiny with random weights (zero
    convolutions included, so its residuals are not zero)."""
    from diffusers import ControlNetModel
    from tests.pipelines.conftest import diffusers_unet

    from latentdiffusion.config import TINY

    net = ControlNetModel.from_unet(diffusers_unet(TINY.unet), conditioning_embedding_out_channels=(16, 32))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    net.save_pretrained(folder / "tinycn")
    return folder / "tinycn"


@pytest.fixture
def start_server():
    """``with start_server(pipe, settings) as server:`` a fresh server for tests that need other settings."""
    return running_server


@pytest.fixture
def to_png():
    return png_bytes


@pytest.fixture
def picture() -> Image.Image:
    return gradient()
