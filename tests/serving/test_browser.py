"""The web page in a real headless Chromium (Debian's ``chromium``, driven by Playwright): type a
prompt, generate, read the image's size; image-to-image with a mask painted on the (scaled) canvas;
hidden elements, the progress bar, the gallery (seed order, scaled-up small images, captions of
interrupted images, download and copy buttons), PNG info by drag-and-drop, the model picker, and the
layout at a desktop and a phone width.

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
    assert page.eval_on_selector("#progress", "p => p.value") == 1  # the bar ends full


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
    caption = page.text_content("#gallery figure pre")  # an interrupted image keeps its caption
    assert caption.startswith("slow\n") and "Size: 256x256" in caption
    assert page.is_visible("#gallery figure .badge")
    assert page.eval_on_selector("#progress", "p => p.value") == 1


def test_inpainting_with_a_mask_painted_on_the_image(page, picture, tmp_path):
    path = tmp_path / "input.png"
    picture.resize((64, 48)).save(path)
    sent = []
    page.on("request", lambda r: sent.append(r) if r.url.endswith("/sdapi/v1/img2img") else None)
    page.click("#img2img summary")
    page.set_input_files("#init-image", str(path))
    page.wait_for_selector("#canvas-box:not([hidden])")
    assert (page.input_value("#width"), page.input_value("#height")) == ("64", "48")
    page.locator("#mask-canvas").scroll_into_view_if_needed()
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


# ---- hidden elements, the gallery, the scaled mask canvas


def test_hidden_elements_stay_hidden_and_the_page_has_a_favicon(page):
    # no API key asked, one model, no image chosen, no preview yet, no hint preview
    for selector in ("#key-row", "#model-row", "#canvas-box", "#preview", "#cn-hint"):
        assert page.eval_on_selector(selector, "e => e.hidden"), selector
        assert not page.is_visible(selector), selector
        assert page.eval_on_selector(selector, "e => getComputedStyle(e).display") == "none", selector
    page.click("#img2img summary")
    assert page.locator("#canvas-box").bounding_box() is None  # no empty canvas before an image
    icon = page.eval_on_selector("link[rel=icon]", "link => link.href")
    response = page.request.get(icon)
    assert response.ok and response.headers["content-type"].startswith("image/svg+xml")


def captions(page) -> list[str]:
    return page.eval_on_selector_all("#gallery figure pre", "pres => pres.map(p => p.textContent)")


def seed_of(caption: str) -> int:
    return int(caption.split("Seed: ")[1].split(",")[0])


def test_batches_appear_in_seed_order_scaled_up_with_crisp_pixels(page):
    page.fill("#prompt", "dots")
    page.fill("#steps", "2")
    page.fill("#seed", "20")
    page.fill("#batch", "3")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length == 3")
    assert [seed_of(c) for c in captions(page)] == [20, 21, 22]
    page.fill("#seed", "40")
    page.fill("#batch", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery figure').length == 5")
    assert [seed_of(c) for c in captions(page)] == [40, 41, 20, 21, 22]  # newest first, each in order
    page.wait_for_function("document.querySelector('#gallery figure img').style.width !== ''")
    shown = page.eval_on_selector(
        "#gallery figure img",
        "img => [img.naturalWidth, img.getBoundingClientRect().width, getComputedStyle(img).imageRendering]",
    )
    assert shown == [64, 320, "pixelated"]  # 64 px shown 5 times larger, pixels square


def test_download_and_copy_parameters(page, browser, server):
    page.fill("#prompt", "a keepsake")
    page.fill("#steps", "2")
    page.fill("#seed", "9")
    page.click("#generate")
    page.wait_for_selector("#gallery figure")
    caption = page.text_content("#gallery figure pre")
    with page.expect_download() as download:
        page.click("#gallery figure a.download")
    assert download.value.suggested_filename.endswith("-9.png")
    saved = Image.open(download.value.path())
    assert saved.format == "PNG" and saved.info["parameters"] == caption
    browser.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    page.click("#gallery figure button.copy")
    page.wait_for_function("document.querySelector('#status').textContent.includes('copied')")
    assert page.evaluate("navigator.clipboard.readText()") == caption


def test_the_mask_painted_on_the_scaled_canvas_marks_the_right_pixels(page, picture, tmp_path):
    path = tmp_path / "input.png"
    picture.resize((64, 48)).save(path)
    page.click("#img2img summary")
    page.set_input_files("#init-image", str(path))
    page.wait_for_selector("#canvas-box:not([hidden])")
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    assert (box["width"], box["height"]) == (448, 336)  # 7 screen pixels per image pixel
    scale = box["width"] / 64

    def at(x: float, y: float) -> tuple[float, float]:  # image pixel -> screen position
        return box["x"] + x * scale, box["y"] + y * scale

    page.mouse.move(*at(10.5, 30.5))
    page.mouse.down()
    page.mouse.move(*at(12.5, 30.5), steps=4)
    page.mouse.up()
    data_url = page.evaluate("maskDataUrl()")
    mask = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))).convert("L")
    assert mask.size == (64, 48)
    assert [mask.getpixel((x, 30)) for x in (10, 11, 12)] == [255, 255, 255]
    # the 16-screen-pixel brush is about 2.3 image pixels wide: nothing far from the stroke
    painted = {(x, y) for x in range(64) for y in range(48) if mask.getpixel((x, y)) > 0}
    assert painted and all(9 <= x <= 14 and 28 <= y <= 33 for x, y in painted)


# ---- PNG info by drag-and-drop, the model picker


def drop_file(page, data: bytes, name: str, mime: str) -> None:
    """Drop a file on the page as a user dragging it from a file manager would."""
    transfer = page.evaluate_handle(
        """([b64, name, mime]) => {
            const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], name, { type: mime }));
            return transfer;
        }""",
        [base64.b64encode(data).decode(), name, mime],
    )
    page.dispatch_event("#form", "drop", {"dataTransfer": transfer})


PROMPT = "a green triangle, 猫\nsecond line"  # not Latin-1: an iTXt chunk in a PNG


def generated_image(server, output_format: str) -> bytes:
    """An image made by the server with known settings: PNG from the web UI's route, JPEG from OpenAI's."""
    import httpx

    if output_format == "png":
        request = {
            "prompt": PROMPT,
            "negative_prompt": "blurry",
            "steps": 3,
            "sampler_name": "DPM++ 2M Karras",
            "cfg_scale": 5.5,
            "seed": 1234,
            "width": 48,
            "height": 32,
        }
        response = httpx.post(server.url + "/sdapi/v1/txt2img", json=request, timeout=60)
        return base64.b64decode(response.json()["images"][0])
    request = {
        "prompt": PROMPT,
        "negative_prompt": "blurry",
        "steps": 3,
        "sampler": "DPM++ 2M Karras",
        "guidance_scale": 5.5,
        "seed": 1234,
        "size": "48x32",
        "output_format": output_format,
    }
    response = httpx.post(server.url + "/v1/images/generations", json=request, timeout=60)
    return base64.b64decode(response.json()["data"][0]["b64_json"])


@pytest.mark.parametrize(
    ("reader", "output_format"), [("page", "png"), ("server", "png"), ("server", "jpeg")]
)
def test_dropping_an_image_reads_its_parameters_back_into_the_form(page, server, reader, output_format):
    import httpx

    data = generated_image(server, output_format)
    if reader == "page":  # a server without /sdapi/v1/png-info: the page reads the PNG's text chunk
        page.route(
            "**/sdapi/v1/png-info", lambda route: route.fulfill(status=404, json={"detail": "Not Found"})
        )
    elif httpx.post(server.url + "/sdapi/v1/png-info", json={"image": ""}).status_code in (404, 405):
        pytest.skip("this server has no /sdapi/v1/png-info")
    drop_file(page, data, f"dropped.{output_format}", f"image/{output_format}")
    page.wait_for_function("document.querySelector('#status').textContent.includes('parameters read')")
    form = {
        name: page.input_value(f"#{name}")
        for name in ("prompt", "negative", "steps", "sampler", "scheduler", "cfg", "seed", "width", "height")
    }
    assert form == {
        "prompt": PROMPT,
        "negative": "blurry",
        "steps": "3",
        "sampler": "DPM++ 2M",
        "scheduler": "karras",
        "cfg": "5.5",
        "seed": "1234",
        "width": "48",
        "height": "32",
    }


def test_a_png_without_parameters_says_so(page, to_png, picture):
    drop_file(page, to_png(picture), "plain.png", "image/png")
    page.wait_for_function(
        "document.querySelector('#status').textContent.includes('no generation parameters')"
    )


def test_the_model_picker_appears_with_several_models_and_switches(browser, server):
    models = [
        {"title": "tiny [0123456789]", "model_name": "tiny", "hash": "0123456789"},
        {"title": "other [abcdef0123]", "model_name": "other", "hash": "abcdef0123"},
    ]
    posted = []

    def options(route):
        if route.request.method == "POST":
            posted.append(json.loads(route.request.post_data))
            route.fulfill(json={})
        else:
            route.fulfill(json={"sd_model_checkpoint": models[0]["title"]})

    page = browser.new_page()
    try:
        page.route("**/sdapi/v1/sd-models", lambda route: route.fulfill(json=models))
        page.route("**/sdapi/v1/options", options)
        page.goto(server.url + "/")
        page.wait_for_selector("#model-row:not([hidden])")
        assert page.input_value("#model-picker") == models[0]["title"]
        page.select_option("#model-picker", models[1]["title"])
        page.wait_for_function("document.querySelector('#status').textContent.includes('model: other')")
        assert posted == [{"sd_model_checkpoint": models[1]["title"]}]
    finally:
        page.close()


# ---- layout at a desktop and a phone width

MIN_CONTROL_PX = 40  # no control may be squeezed narrower than this
CONTROLS = "input, select, textarea, button, a.button, canvas, progress, #gallery img"


@pytest.mark.parametrize(("width", "height"), [(1280, 800), (375, 740)])
def test_layout_fits_desktop_and_phone_widths(browser, server, picture, tmp_path, width, height):
    path = tmp_path / "input.png"
    picture.save(path)
    page = browser.new_page()
    try:
        page.set_viewport_size({"width": width, "height": height})
        page.goto(server.url + "/")
        page.wait_for_function("document.querySelector('#sampler').options.length > 0")
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_selector("#gallery figure img")
        page.click("#img2img summary")
        page.click("#controlnet summary")
        page.set_input_files("#init-image", str(path))
        page.wait_for_selector("#canvas-box:not([hidden])")
        shot = tmp_path / f"page-{width}.png"
        page.screenshot(path=str(shot), full_page=True)
        assert Image.open(shot).width == width  # nothing wider than the screen
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        boxes = page.eval_on_selector_all(
            CONTROLS,
            """elements => elements.filter(e => e.getClientRects().length > 0).map(e => {
                const r = e.getBoundingClientRect();
                return [e.id || e.tagName + '.' + e.className, r.left, r.right, r.width];
            })""",
        )
        assert len(boxes) > 30
        narrow = [b for b in boxes if b[3] < MIN_CONTROL_PX]
        outside = [b for b in boxes if b[1] < 0 or b[2] > width + 0.5]
        assert narrow == [] and outside == []
        form, live = (page.locator(s).bounding_box() for s in ("#form", "#live"))
        if width < 760:  # one column: the progress section under the form
            assert live["y"] >= form["y"] + form["height"] and form["width"] > width * 0.9
        else:  # two columns side by side
            assert live["x"] >= form["x"] + form["width"]
    finally:
        page.close()


def test_the_api_key_field_shows_only_when_a_key_is_needed(browser, tiny_pipe, start_server):
    from latentdiffusion.serving.settings import ServerSettings

    from .conftest import TEST_LIMITS

    with start_server(tiny_pipe, ServerSettings(limits=TEST_LIMITS, api_key="sesame")) as keyed:
        page = browser.new_page()
        try:
            page.goto(keyed.url + "/")
            page.wait_for_selector("#key-row:not([hidden])")
            assert page.is_visible("#api-key")
            page.wait_for_function("document.querySelector('#status').textContent.includes('401')")
            page.fill("#api-key", "sesame")
            page.dispatch_event("#api-key", "change")
            page.wait_for_function("document.querySelector('#sampler').options.length > 0")
        finally:
            page.evaluate("localStorage.clear()")
            page.close()
