"""The web page's model picker on a real server of two models (``ldm serve --model-dir``), in headless
Chromium: it appears, lists both, switches through POST /sdapi/v1/options, and the next image is the
other model's."""

from __future__ import annotations

import httpx
import pytest

try:
    from .test_browser import browser  # noqa: F401
except ImportError:  # the browser module skipped itself (no Playwright or no Chromium) before defining it
    pytest.skip("the browser tests need Playwright and Chromium", allow_module_level=True)
from .test_openai_models import models_dir, served  # noqa: F401


def test_the_model_picker_switches_the_served_model(browser, served):  # noqa: F811
    page = browser.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(served.url + "/")
        page.wait_for_selector("#model-row:not([hidden])")
        names = page.eval_on_selector_all("#model-picker option", "options => options.map(o => o.text)")
        assert sorted(names) == ["one", "two"]
        current = page.eval_on_selector("#model-picker", "s => s.options[s.selectedIndex].text")
        other = "two" if current == "one" else "one"
        page.select_option("#model-picker", label=other)
        page.wait_for_function("document.querySelector('#status').textContent.startsWith('model: ')")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_selector("#gallery figure pre")
        models = {m["model_name"]: m for m in httpx.get(served.url + "/sdapi/v1/sd-models").json()}
        assert f"Model hash: {models[other]['hash']}," in page.text_content("#gallery figure pre")
    finally:
        page.close()
