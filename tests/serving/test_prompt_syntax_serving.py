"""AUTOMATIC1111's prompt editing, alternation and AND through the command line and the AUTOMATIC1111
routes (the library parses the prompt text, so every front end honours it): the image follows the
syntax and the PNG info holds the prompt as typed."""

from __future__ import annotations

import base64
import io
import json

import httpx
from PIL import Image

from latentdiffusion.cli.main import main
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters

PROMPT = "a [red:blue:0.5] [circle|square] :1.3 AND a dog :0.6"
NEGATIVE = "[blurry::2] AND ugly"  # negative prompts: scheduled, AND is text


def txt2img(server, **fields):
    body = {"steps": 3, "seed": 2, "width": 32, "height": 32, **fields}
    data = httpx.post(server.url + "/sdapi/v1/txt2img", json=body, timeout=60).json()
    images = [Image.open(io.BytesIO(base64.b64decode(b64))) for b64 in data["images"]]
    return images, json.loads(data["info"])


def test_a1111_txt2img_and_hires_fix_honour_the_syntax(server):
    images, info = txt2img(server, prompt=PROMPT, negative_prompt=NEGATIVE)
    text = images[0].info["parameters"]
    assert text.startswith(f"{PROMPT}\nNegative prompt: {NEGATIVE}\n") and info["infotexts"] == [text]
    plain, _ = txt2img(server, prompt="a red circle", negative_prompt=NEGATIVE)
    assert images[0].tobytes() != plain[0].tobytes()
    same, _ = txt2img(server, prompt="a red circle :1", negative_prompt="[blurry|blurry]")
    blurry, _ = txt2img(server, prompt="a red circle", negative_prompt="blurry")
    assert same[0].tobytes() == blurry[0].tobytes()  # one part of weight 1, one text: the plain image
    hires, _ = txt2img(
        server,
        prompt="[a:b:1.5]",
        enable_hr=True,
        hr_scale=1.5,
        hr_second_pass_steps=2,
        denoising_strength=0.5,
    )
    assert hires[0].size == (48, 48) and hires[0].info["parameters"].startswith("[a:b:1.5]\n")


def test_cli_generate_records_the_prompt_as_typed(tmp_path):
    out = tmp_path / "edit.png"
    args = ["generate", PROMPT, "--negative", NEGATIVE, "--model", "preset:tiny", "--steps", "2"]
    assert main([*args, "--size", "32", "--quiet", "-o", str(out)]) == 0
    parsed = parse_parameters(read_parameters(out))
    assert parsed["prompt"] == PROMPT and parsed["negative_prompt"] == NEGATIVE
