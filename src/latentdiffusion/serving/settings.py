"""Server settings and per-request limits, checked before a request takes a place in the queue.

A request over a limit is answered HTTP 422 with a message that names the field (``FieldError``), so a
client learns what to change instead of waiting in the queue for a failure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentdiffusion.errors import UserError
from latentdiffusion.serving.connections import ConnectionLimits

MAX_SEED = 2**32 - 1  # the seed range of the AUTOMATIC1111 web UI


class FieldError(UserError):
    """Bad input in one request field; the server answers 422 with ``field: message``."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the queue bounds how many requests wait."""

    max_side: int = 1024  # pixels, width and height of outputs and of inputs used at their own size
    max_steps: int = 150
    max_images: int = 8  # per request (n, batch_size * n_iter)
    max_prompt_chars: int = 4000
    max_body_bytes: int = 32 * 2**20  # request bodies, uploads included
    max_input_pixels: int = 4096 * 4096  # uploads are refused before decoding beyond this
    queue_size: int = 8  # requests waiting behind the running one; more get 429
    max_control_units: int = 4  # ControlNet units per request


@dataclass(frozen=True)
class ServerSettings:
    """How ``create_app`` serves a model."""

    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None  # when set, API routes need ``Authorization: Bearer <key>``
    output_dir: Path | None = None  # when set, every image is saved there as PNG with its parameters
    model_source: str = ""  # what the model was loaded from, reported by /sdapi/v1/sd-models
    controlnet_dir: Path | None = (
        None  # ControlNets offered by /controlnet/model_list (serving.controlnet_api)
    )
    lora_dir: Path | None = None  # LoRA files offered by the ComfyUI API's LoraLoader (serving.comfy)
    model_dir: Path | None = None  # models listed by /sdapi/v1/sd-models, switched by POST /sdapi/v1/options
    motion_dir: Path | None = None  # AnimateDiff motion modules offered by /v1/videos (serving.video_api)
    # reads a model source for a switch or a reload (ldm serve: with its --device, --precision, --lora)
    loader: Callable[[str], Any] | None = field(default=None, compare=False)
    # time limits on request heads and bodies, caps on waiting connections (serving.connections)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


def check_size(limits: Limits, multiple: int, width: int, height: int, prefix: str = "") -> None:
    """Sides must be positive multiples of ``multiple`` (8 for Stable Diffusion) and at most max_side."""
    for name, side in (("width", width), ("height", height)):
        if side < multiple or side % multiple:
            raise FieldError(prefix + name, f"must be a positive multiple of {multiple}, got {side}")
        if side > limits.max_side:
            raise FieldError(prefix + name, f"must be at most {limits.max_side}, got {side}")


def check_count(name: str, value: int, largest: int) -> None:
    if value < 1:
        raise FieldError(name, f"must be at least 1, got {value}")
    if value > largest:
        raise FieldError(name, f"must be at most {largest}, got {value}")


def check_prompt(limits: Limits, name: str, text: str) -> None:
    if len(text) > limits.max_prompt_chars:
        raise FieldError(name, f"is {len(text)} characters long; the limit is {limits.max_prompt_chars}")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: addresses other machines cannot reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
