"""The web page's ControlNet panel in a real headless Chromium: pick the ControlNet and a hint image,
preview the hint (/controlnet/detect), generate; the request carries one unit in
alwayson_scripts.controlnet.args and the image's PNG info records it. Skips as test_browser does."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

# the browser and the served ControlNet folder
try:
    from .test_browser import browser, image_size  # noqa: F401
except ImportError:  # the browser module skipped itself (no Playwright or no Chromium) before defining it
    pytest.skip("the browser tests need Playwright and Chromium", allow_module_level=True)
from .test_controlnet_serving import cn_server, controlnet_dir, drawing  # noqa: F401

cv2 = pytest.importorskip("cv2")


@pytest.fixture
def page(browser, cn_server):  # noqa: F811
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(cn_server.url + "/")
    page.wait_for_function("document.querySelector('#cn-model').options.length > 1")  # lists loaded
    yield page
    page.close()


def test_controlnet_panel_sends_a_unit_and_previews_the_hint(page, tmp_path):
    hint = tmp_path / "hint.png"
    drawing().save(hint)
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/sdapi/v1/txt2img") else None)
    page.click("#controlnet summary")
    models = page.eval_on_selector_all("#cn-model option", "options => options.map(o => o.value)")
    assert models[0] == "" and models[2].startswith("tinycn [")
    page.select_option("#cn-model", models[2])
    page.set_input_files("#cn-image", str(hint))
    page.select_option("#cn-module", "canny")
    page.fill("#cn-weight", "1.5")
    page.fill("#cn-end", "0.5")
    page.select_option("#cn-mode", "My prompt is more important")
    page.click("#cn-detect")
    page.wait_for_selector("#cn-hint:not([hidden])")
    shown = page.eval_on_selector("#cn-hint", "img => img.src").split(",", 1)[1]
    edges = np.asarray(Image.open(io.BytesIO(base64.b64decode(shown))))
    assert np.array_equal(edges[:, :, 0], cv2.Canny(np.asarray(drawing()), 100, 200))
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "2")
    page.click("#generate")
    assert image_size(page, "#gallery figure img") == (64, 64)
    unit = json.loads(sent[0].post_data)["alwayson_scripts"]["controlnet"]["args"][0]
    assert unit["model"] == models[2] and unit["module"] == "canny" and unit["image"].startswith("data:image")
    assert (unit["weight"], unit["guidance_start"], unit["guidance_end"]) == (1.5, 0, 0.5)
    parameters = page.text_content("#gallery figure pre")
    assert f'ControlNet 0: "Module: canny, Model: {models[2]}, Weight: 1.5' in parameters
    assert "Control Mode: My prompt is more important" in parameters


def test_a_model_without_a_hint_image_is_refused_on_the_page(page):
    page.click("#controlnet summary")
    page.select_option("#cn-model", index=2)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#status').textContent.includes('choose a hint image')")
