"""The web UI's image tools: ``png-info``, ``upscalers``, ``latent-upscale-modes``,
``extra-single-image`` and ``extra-batch-images``.

Upscalers: "None" (the image as it is), the plain resamplers "Lanczos" and "Nearest", and the shipped x4
upscaler (``ld.load("upscaler")``, ``UPSCALER_NAME``) when the model in memory works in the same latent
world, i.e. has the same autoencoder (the shipped shapes model): it was trained on that world's images
only. A model upscaler runs as the web UI runs one: x4 passes (at most three) until the image covers the
target, then a Lanczos resize to it; sides are rounded down to multiples of 8. The same upscalers serve
the hires fix (``pipelines.hires``), with the latent modes besides.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from typing import Any

import torch
from fastapi import APIRouter, Request
from PIL import Image
from pydantic import ConfigDict, Field, FiniteFloat

from latentdiffusion.pipelines.hires import LATENT_MODES, RESAMPLERS
from latentdiffusion.pipelines.metadata import parse_parameters
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.serving.codec import decode_base64, decode_image, encode_base64
from latentdiffusion.serving.common import ServerState, await_job, server_state
from latentdiffusion.serving.queue import Job
from latentdiffusion.serving.schemas import ValidText
from latentdiffusion.serving.settings import FieldError

router = APIRouter()
UPSCALER_NAME = "LDM x4 (shapes)"
UPSCALER_SEED = 0  # the upscaler samples; a fixed seed makes the tool repeatable
MODEL_PASSES = 3  # the web UI's most x4 passes


# ---------------------------------------------------------------------------------------------- upscalers


class Upscalers:
    """The shipped x4 upscaler, read once when first needed and kept on the model's device."""

    def __init__(self) -> None:
        self._model: Pipeline | None = None
        self._missing = False
        self._lock = threading.Lock()
        self._fit: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def shipped(self) -> Pipeline | None:
        with self._lock:
            if self._model is None and not self._missing:
                from latentdiffusion.errors import UserError
                from latentdiffusion.pipelines.loading import load_pipeline

                try:
                    self._model = load_pipeline("upscaler")
                except UserError:  # not installed
                    self._missing = True
            return self._model

    def fits(self, pipe: Pipeline) -> bool:
        """The shipped upscaler has ``pipe``'s autoencoder (config and weights): the same latent world.
        Checked once per autoencoder."""
        vae = pipe.vae
        if vae not in self._fit:
            self._fit[vae] = self._same_autoencoder(pipe)
        return self._fit[vae]

    def _same_autoencoder(self, pipe: Pipeline) -> bool:
        model = self.shipped()
        if model is None or model.config.autoencoder != pipe.config.autoencoder:
            return False
        ours, theirs = pipe.vae.state_dict(), model.vae.state_dict()
        if any(v.device.type == "meta" for v in ours.values()):
            return False
        return ours.keys() == theirs.keys() and all(torch.equal(ours[k].cpu(), theirs[k].cpu()) for k in ours)

    def names(self, pipe: Pipeline) -> list[str]:
        return ["None", *RESAMPLERS, *([UPSCALER_NAME] if self.fits(pipe) else [])]

    def run_model(self, pipe: Pipeline, images: list[Image.Image]) -> list[Image.Image]:
        """One x4 pass of the shipped upscaler over each image (on ``pipe``'s device)."""
        model = self.shipped()
        assert model is not None
        device = next(pipe.vae.parameters()).device
        if next(model.vae.parameters()).device != device:
            model.to(device)
        return [model.upscale(image, "", seed=UPSCALER_SEED)[0] for image in images]


UPSCALERS = Upscalers()


def upscale_to(pipe: Pipeline, image: Image.Image, name: str, width: int, height: int) -> Image.Image:
    """``image`` at ``width`` x ``height`` by the upscaler ``name`` (a model: x4 passes, then Lanczos)."""
    if name in RESAMPLERS:
        return image.resize((width, height), RESAMPLERS[name])
    for _ in range(MODEL_PASSES):
        if image.width >= width and image.height >= height:
            break
        image = UPSCALERS.run_model(pipe, [image])[0]
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def check_upscaler(state: ServerState, name: str, field: str, latent: bool = False) -> None:
    known = UPSCALERS.names(state.pipe) + (list(LATENT_MODES) if latent else [])
    if name not in known:
        raise FieldError(field, f"unknown upscaler {name!r}; known here: {', '.join(known)}")


@router.get("/upscalers")
async def upscalers(request: Request) -> list[dict[str, Any]]:
    """The upscalers for ``extra-single-image`` and the hires fix (``hr_upscaler``)."""
    state = server_state(request)
    names = await asyncio.to_thread(UPSCALERS.names, state.pipe)
    return [
        {
            "name": name,
            "model_name": "upscaler" if name == UPSCALER_NAME else None,
            "model_path": None,
            "model_url": None,
            "scale": 4 if name == UPSCALER_NAME else None,
        }
        for name in names
    ]


@router.get("/latent-upscale-modes")
async def latent_upscale_modes() -> list[dict[str, str]]:
    """The hires fix's latent interpolations (``hr_upscaler``)."""
    return [{"name": name} for name in LATENT_MODES]


# ---------------------------------------------------------------------------------------------- extras


class ExtrasFields(ValidText):
    """The web UI's ``ExtrasBaseRequest``: resizing and upscaler fields (face restoration refused)."""

    model_config = ConfigDict(extra="allow")

    resize_mode: int = Field(0, ge=0, le=1, description="0: scale by upscaling_resize; 1: to w x h")
    show_extras_results: bool = True
    gfpgan_visibility: FiniteFloat = Field(0, ge=0, le=1, description="no face restorer: must be 0")
    codeformer_visibility: FiniteFloat = Field(0, ge=0, le=1, description="no face restorer: must be 0")
    codeformer_weight: FiniteFloat = Field(0, ge=0, le=1)
    upscaling_resize: FiniteFloat = Field(2, gt=0, le=8)
    upscaling_resize_w: int = Field(512, ge=1)
    upscaling_resize_h: int = Field(512, ge=1)
    upscaling_crop: bool = True
    upscaler_1: str | None = "None"
    upscaler_2: str | None = "None"
    extras_upscaler_2_visibility: FiniteFloat = Field(0, ge=0, le=1)
    upscale_first: bool = False


class ExtrasSingleImage(ExtrasFields):
    image: str = Field(description="base64 image")


class ImageData(ValidText):
    data: str
    name: str = ""


class ExtrasBatchImages(ExtrasFields):
    imageList: list[ImageData] = Field(min_length=1)


def check_extras(state: ServerState, body: ExtrasFields) -> tuple[str | None, str | None]:
    if body.gfpgan_visibility or body.codeformer_visibility:
        field = "gfpgan_visibility" if body.gfpgan_visibility else "codeformer_visibility"
        raise FieldError(field, "face restoration is not available here; send 0")
    names = []
    for field in ("upscaler_1", "upscaler_2"):
        name = getattr(body, field)
        name = None if name in (None, "None") else name
        if name is not None:
            check_upscaler(state, name, field)
        names.append(name)
    return names[0], names[1]


def extras_size(body: ExtrasFields, image: Image.Image) -> tuple[float, tuple[int, int]]:
    """The scale and the size before cropping, as the web UI's postprocessing computes them."""
    if body.resize_mode == 1:
        scale = max(body.upscaling_resize_w / image.width, body.upscaling_resize_h / image.height)
    else:
        scale = body.upscaling_resize
    return scale, (int(image.width * scale) // 8 * 8, int(image.height * scale) // 8 * 8)


def postprocess(pipe: Pipeline, image: Image.Image, body: ExtrasFields, names: tuple) -> Image.Image:
    """Upscale by the first upscaler (blended with the second at its visibility), then crop (mode 1)."""
    first, second = names
    if first is None:
        return image
    scale, (width, height) = extras_size(body, image)
    result = upscale_to(pipe, image.convert("RGB"), first, width, height)
    if second is not None and body.extras_upscaler_2_visibility > 0:
        other = upscale_to(pipe, image.convert("RGB"), second, width, height)
        result = Image.blend(result, other, body.extras_upscaler_2_visibility)
    if body.resize_mode == 1 and body.upscaling_crop:
        w, h = body.upscaling_resize_w, body.upscaling_resize_h
        left, top = (result.width - w) // 2, (result.height - h) // 2
        result = result.crop((left, top, left + w, top + h))
    info = f"Postprocess upscale by: {scale:g}, Postprocess upscaler: {first}"
    if second is not None and body.extras_upscaler_2_visibility > 0:
        info += f", Postprocess upscaler 2: {second}"
    result.info["parameters"] = _with_postprocess(image.info.get("parameters"), info)
    return result


def _with_postprocess(parameters: str | None, line: str) -> str:
    return f"{parameters}, {line}" if parameters else line


def check_output(state: ServerState, body: ExtrasFields, image: Image.Image, names: tuple) -> None:
    if names[0] is None:
        return
    _, (width, height) = extras_size(body, image)
    top = state.limits.max_side * 4  # an upscaled image may be larger than a generated one
    if min(width, height) < 8 or max(width, height) > top:
        raise FieldError(
            "upscaling_resize", f"the result would be {width}x{height}; sides must be in [8, {top}]"
        )


async def run_extras(
    request: Request, state: ServerState, images: list[Image.Image], body: ExtrasFields
) -> list:
    names = check_extras(state, body)
    for image in images:
        check_output(state, body, image, names)

    def work(callback: Any) -> list[Image.Image]:
        return [postprocess(state.pipe, image, body, names) for image in images]

    result = await await_job(request, state, Job(work=work, steps=1, description="extras"))
    return result.images


@router.post("/extra-single-image")
async def extra_single_image(body: ExtrasSingleImage, request: Request) -> dict[str, Any]:
    """Upscale one image -> ``{"html_info", "image"}``; its PNG info is kept, plus the upscale."""
    state = server_state(request)
    image = await asyncio.to_thread(decode_image, decode_base64(body.image, "image"), "image", state.limits)
    (result,) = await run_extras(request, state, [image], body)
    encoded = await asyncio.to_thread(encode_base64, result)
    return {"html_info": result.info.get("parameters", ""), "image": encoded}


@router.post("/extra-batch-images")
async def extra_batch_images(body: ExtrasBatchImages, request: Request) -> dict[str, Any]:
    """Upscale several images -> ``{"html_info", "images"}``."""
    state = server_state(request)

    def decode_all() -> list[Image.Image]:
        return [
            decode_image(
                decode_base64(item.data, f"imageList[{i}].data"), f"imageList[{i}].data", state.limits
            )
            for i, item in enumerate(body.imageList)
        ]

    if len(body.imageList) > state.limits.max_images:
        raise FieldError("imageList", f"at most {state.limits.max_images} images, got {len(body.imageList)}")
    results = await run_extras(request, state, await asyncio.to_thread(decode_all), body)
    encoded = await asyncio.to_thread(lambda: [encode_base64(image) for image in results])
    return {"html_info": results[0].info.get("parameters", "") if results else "", "images": encoded}


# ---------------------------------------------------------------------------------------------- png-info


class PngInfoRequest(ValidText):
    image: str = Field(description="base64 image (PNG with a parameters chunk, or JPEG/WebP with EXIF)")


def exif_comment(image: Image.Image) -> str | None:
    """The EXIF UserComment (where the web UI writes JPEG and WebP parameters), decoded."""
    try:
        raw = image.getexif().get_ifd(0x8769).get(0x9286)
    except Exception:  # a damaged EXIF block: no parameters
        return None
    if isinstance(raw, str):
        return raw or None
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    prefix, text = raw[:8], raw[8:]
    if prefix.startswith(b"UNICODE"):
        big = text.decode("utf-16-be", "replace")
        return big if big.isprintable() or "\n" in big else text.decode("utf-16-le", "replace")
    return text.decode("utf-8", "replace").rstrip("\x00") or None


def parsed_parameters(text: str) -> dict[str, Any]:
    """The web UI's ``parse_generation_parameters`` shape: Prompt, Negative prompt, each setting,
    and Size as Size-1 / Size-2."""
    parsed = parse_parameters(text)
    result: dict[str, Any] = {"Prompt": parsed["prompt"], "Negative prompt": parsed["negative_prompt"]}
    for key, value in parsed["settings"].items():
        result[key] = value
        if key == "Size" and "x" in value:
            result["Size-1"], result["Size-2"] = value.split("x", 1)
    return result


@router.post("/png-info")
async def png_info(body: PngInfoRequest, request: Request) -> dict[str, Any]:
    """The generation parameters in an image: ``info`` (the text), ``items`` (its other text chunks)
    and ``parameters`` (the text parsed)."""
    state = server_state(request)
    image = await asyncio.to_thread(decode_image, decode_base64(body.image, "image"), "image", state.limits)
    text = image.info.get("parameters") if isinstance(image.info.get("parameters"), str) else None
    text = text or exif_comment(image)
    items = {k: v for k, v in image.info.items() if isinstance(v, str) and k != "parameters"}
    return {"info": text or "", "items": items, "parameters": parsed_parameters(text) if text else {}}
