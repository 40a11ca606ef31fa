"""Generation parameters in PNG files, in the text format of AUTOMATIC1111's web UI.

The ``parameters`` tEXt chunk holds three parts: the prompt (any number of lines), an optional line
starting with ``Negative prompt:``, and a last line of ``Key: value`` pairs separated by ``, ``
(``Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 512x512, Model: sd15``).
Values that contain ``,`` or ``:`` are written as JSON strings, as that format does.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from latentdiffusion.files import atomic_write

NEGATIVE_PREFIX = "Negative prompt: "

# Our sampler names -> the display names other tools write and read.
SAMPLER_DISPLAY_NAMES = {
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "plms": "PLMS",
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "unipc": "UniPC",
    "lcm": "LCM",
    "tcd": "TCD",
}
SIGMAS_DISPLAY_NAMES = {"karras": "Karras", "exponential": "Exponential"}


def sampler_display_name(sampler: str, sigmas: str | None) -> str:
    """``("dpmpp_2m", "karras")`` -> ``"DPM++ 2M Karras"``."""
    name = SAMPLER_DISPLAY_NAMES.get(sampler, sampler)
    return f"{name} {SIGMAS_DISPLAY_NAMES[sigmas]}" if sigmas in SIGMAS_DISPLAY_NAMES else name


def skip_layer_settings(slg: Any) -> dict[str, Any]:
    """PNG-info entries of skip-layer guidance (``diffusion.guidance.SkipLayerGuidance``), one setting
    ``SLG: "layers 7,8,9, scale 2.8, start 0.01, stop 0.2"``; empty when there is none."""
    if slg is None:
        return {}
    layers = ",".join(str(i) for i in slg.layers)
    return {"SLG": f"layers {layers}, scale {slg.scale:g}, start {slg.start:g}, stop {slg.stop:g}"}


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text) if re.search(r"[,:\n\"]", text) else text


def format_parameters(prompt: str, negative_prompt: str | None, settings: dict[str, Any]) -> str:
    """Write the ``parameters`` text: prompt, optional negative prompt, then ``Key: value, ...``."""
    lines = [prompt]
    if negative_prompt:
        lines.append(NEGATIVE_PREFIX + negative_prompt)
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items()))
    return "\n".join(lines)


_SETTING = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def _parse_settings(line: str) -> dict[str, str]:
    settings = {}
    for key, value in _SETTING.findall(line):
        settings[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    return settings


def parse_parameters(text: str) -> dict[str, Any]:
    """Read a ``parameters`` text back into prompt, negative prompt and a dict of settings."""
    lines = text.rstrip("\n").split("\n")
    settings: dict[str, str] = {}
    if len(lines) > 1 and _SETTING.match(lines[-1]) and "Steps:" in lines[-1]:
        settings = _parse_settings(lines.pop())
    negative: list[str] = []
    for i, line in enumerate(lines):
        if line.startswith(NEGATIVE_PREFIX):
            negative = [line[len(NEGATIVE_PREFIX) :], *lines[i + 1 :]]
            lines = lines[:i]
            break
    return {"prompt": "\n".join(lines), "negative_prompt": "\n".join(negative), "settings": settings}


def with_settings(parameters: str, settings: dict[str, Any], before: str | None = None) -> str:
    """``parameters`` with ``settings`` added to its settings line: in front of the setting ``before``
    if the line has one, else at its end (a text without a settings line gets one)."""
    if not settings:
        return parameters
    added = ", ".join(f"{key}: {_quote(value)}" for key, value in settings.items())
    head, _, line = parameters.rpartition("\n")
    if not _SETTING.match(line) or "Steps:" not in line:
        return f"{parameters}\n{added}"
    match = re.search(rf"(^|, ){re.escape(before)}: ", line) if before else None
    if match is None:
        line = f"{line}, {added}"
    else:
        at = match.start() + len(match.group(1))
        line = f"{line[:at]}{added}, {line[at:]}"
    return f"{head}\n{line}" if head or parameters.count("\n") else line


def with_model_hash(parameters: str, model_hash: str | None) -> str:
    """The web UI's ``Model hash: abcdef0123`` (first 10 hex digits of the checkpoint's sha256), put
    before ``Model:`` as it writes them; the text unchanged without a hash."""
    return with_settings(parameters, {"Model hash": model_hash}, before="Model") if model_hash else parameters


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> None:
    """Save ``image`` as PNG with its generation parameters, atomically."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def read_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG file, or None."""
    with Image.open(path) as image:
        return image.info.get("parameters")
