"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright): type a
prompt, generate, read the image's size; then image-to-image with a mask painted on the canvas.

Skips with the reason when Playwright or a Chromium executable is missing (``.ci/run`` installs both).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs the 'playwright' package"
)
CHROMIUM = next(
    (
        path
        for path in (shutil.which("chromium"), "/usr/bin/chromium", shutil.which("chromium-browser"))
        if path and Path(path).exists()
    ),
    None,
)
if CHROMIUM is None:
    pytest.skip(
        "no Chromium installed (Debian: apt-get install chromium; .ci/run does)", allow_module_level=True
    )

# Flags for a closed network: nothing phones home, no sandbox (containers), a fresh profile.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with sync_api.sync_playwright() as playwright:
        profile = tmp_path_factory.mktemp("chromium-profile")
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=FLAGS, headless=True
        )
        yield context
        context.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelector('#sampler').options.length > 0")  # start-up done
    yield page
    page.close()


def image_size(page, selector: str) -> tuple[int, int]:
    page.wait_for_function(
        f"document.querySelector('{selector}') && document.querySelector('{selector}').naturalWidth > 0"
    )
    return tuple(page.eval_on_selector(selector, "img => [img.naturalWidth, img.naturalHeight]"))


def test_type_a_prompt_generate_and_read_the_image(page):
    assert page.input_value("#width") == "64"  # the model's defaults, from /health
    assert page.locator("#sampler option").count() >= 10
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "2")
    page.fill("#width", "48")
    page.fill("#seed", "5")
    page.click("#generate")
    assert image_size(page, "#gallery figure img") == (48, 64)
    parameters = page.text_content("#gallery figure pre")
    assert parameters.startswith("a red circle\n") and "Seed: 5" in parameters and "Size: 48x64" in parameters
    assert "done" in page.text_content("#status")


def test_live_progress_then_interrupt(page):
    page.fill("#prompt", "slow")
    page.fill("#steps", "150")
    page.fill("#width", "256")
    page.fill("#height", "256")
    page.click("#generate")
    page.wait_for_selector("#preview:not([hidden])")  # a live preview arrived while sampling
    assert 0 < float(page.eval_on_selector("#progress", "p => p.value")) < 1
    page.click("#interrupt")
    page.wait_for_function("document.querySelector('#status').textContent.includes('interrupted')")
    assert image_size(page, "#gallery figure img") == (256, 256)


def test_inpainting_with_a_mask_painted_on_the_image(page, picture, tmp_path):
    path = tmp_path / "input.png"
    picture.resize((64, 48)).save(path)
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/sdapi/v1/img2img") else None)
    page.click("#img2img summary")
    page.set_input_files("#init-image", str(path))
    page.wait_for_selector("#canvas-box:not([hidden])")
    assert (page.input_value("#width"), page.input_value("#height")) == ("64", "48")
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=5)
    page.mouse.up()
    page.fill("#prompt", "a blue line")
    page.fill("#steps", "2")
    page.click("#generate")
    assert image_size(page, "#gallery figure img") == (64, 48)
    body = json.loads(sent[0].post_data)
    assert body["init_images"][0].startswith("data:image/png")
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"].split(",", 1)[1]))).convert("L")
    assert mask.size == (64, 48) and mask.getpixel((32, 24)) == 255 and mask.getpixel((2, 2)) == 0
    assert "Mask blur: 4" in page.text_content("#gallery figure pre")
