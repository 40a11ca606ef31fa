"""AUTOMATIC1111's ControlNet extension over HTTP: its routes (``/controlnet/version``, ``model_list``,
``module_list``, ``detect``, ``settings``) and its units in txt2img/img2img requests
(``alwayson_scripts.controlnet.args``), turned into ``ld.Control`` units.

ControlNets are the entries of the server's ``--controlnet-dir``: files (.safetensors, .pth, .ckpt, .pt,
.bin; original ``control_model.*`` layout) and folders holding a diffusers ``config.json``, directly
inside it. Each is named as the extension names its models, ``"<file or folder stem> [<hash>]"``, the
hash being the web UI's short model hash (the first 8 hex digits of the SHA-256 of the 64 KiB at
offset 1 MiB of the file; for a folder, of its weights file). A unit's ``model`` may be that title, the
stem alone, or either in any case. Loaded ControlNets are kept for the next request (the two most
recently used).
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from PIL import Image

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.control import Control, hint_image
from latentdiffusion.pipelines.preprocessors import PREPROCESSORS, Preprocessor, find_preprocessor
from latentdiffusion.serving.codec import decode_base64_image, encode_base64
from latentdiffusion.serving.common import ServerState, server_state
from latentdiffusion.serving.schemas import ControlNetUnitRequest, DetectRequest, Txt2ImgRequest
from latentdiffusion.serving.settings import FieldError

router = APIRouter(prefix="/controlnet", tags=["AUTOMATIC1111 ControlNet extension API"])

API_VERSION = 3  # the extension's get_api_version() for the request format served here
FILE_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt", ".bin")
FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors")
CACHED_NETWORKS = 2
# the extension's older resize-mode names, and its 3: "Just Resize (Latent upscale)"
RESIZE_ALIASES = {
    "Inner Fit (Scale to Fit)": "Crop and Resize",
    "Scale to Fit (Inner Fit)": "Crop and Resize",
    "Outer Fit (Shrink to Fit)": "Resize and Fill",
    "Envelope (Outer Fit)": "Resize and Fill",
    3: "Just Resize",
}


def short_hash(path: Path) -> str:
    """The web UI's short model hash (``sd_models.model_hash``): SHA-256 of 64 KiB at 1 MiB, 8 digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        file.seek(0x100000)
        digest.update(file.read(0x10000))
    return digest.hexdigest()[:8]


@dataclass(frozen=True)
class ControlNetEntry:
    name: str  # the file's or folder's stem
    path: Path
    hash: str

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]"


def weights_file(folder: Path) -> Path | None:
    if not (folder / "config.json").is_file():
        return None
    return next((folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()), None)


def scan(folder: Path | None) -> list[ControlNetEntry]:
    """The ControlNets directly inside ``folder``, by name."""
    if folder is None or not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        weights = path if path.is_file() and path.suffix.lower() in FILE_SUFFIXES else None
        if path.is_dir():
            weights = weights_file(path)
        if weights is not None and path.stem != "None":
            name = path.stem if path.is_file() else path.name
            entries.append(ControlNetEntry(name, path, short_hash(weights)))
    return entries


class ControlNetLibrary:
    """The ControlNets of a folder: listed by title, found by title or name, loaded once and kept."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self._loaded: OrderedDict[tuple[Path, float], Any] = OrderedDict()
        self._lock = threading.Lock()

    def titles(self) -> list[str]:
        return [entry.title for entry in scan(self.folder)]

    def find(self, model: str, field: str) -> ControlNetEntry:
        if self.folder is None:
            raise FieldError(
                field, "this server offers no ControlNets (start it with ldm serve --controlnet-dir DIR)"
            )
        wanted = model.strip().lower()
        for entry in scan(self.folder):
            if (
                wanted in (entry.title.lower(), entry.name.lower())
                or wanted.split(" [")[0] == entry.name.lower()
            ):
                return entry
        known = ", ".join(self.titles()) or "none"
        raise FieldError(field, f"unknown ControlNet {model!r}; known (GET /controlnet/model_list): {known}")

    def load(self, path: Path) -> Any:
        """The network at ``path`` (blocking: called in the job's thread)."""
        from latentdiffusion.checkpoints.controlnet import load_controlnet

        key = (path, path.stat().st_mtime)
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
        network = load_controlnet(path)
        with self._lock:
            self._loaded[key] = network
            while len(self._loaded) > CACHED_NETWORKS:
                self._loaded.popitem(last=False)
        return network


def library(state: ServerState) -> ControlNetLibrary:
    return state.controlnets


# ---- units of txt2img / img2img requests ----


def control_units(
    state: ServerState,
    body: Txt2ImgRequest,
    seed: int,
    init_image: Image.Image | None = None,
) -> list[Control]:
    """The enabled units of ``body.alwayson_scripts.controlnet.args`` as ``Control`` units whose model
    is still a path (``load_models`` loads them in the job). Blocking (image decoding)."""
    script = body.alwayson_scripts.controlnet
    units = [(i, unit) for i, unit in enumerate(script.args if script else []) if unit.enabled]
    if len(units) > state.limits.max_control_units:
        raise FieldError(
            "alwayson_scripts.controlnet.args",
            f"has {len(units)} enabled units; at most {state.limits.max_control_units} are accepted",
        )
    return [
        unit_control(state, unit, f"alwayson_scripts.controlnet.args[{i}]", seed, init_image)
        for i, unit in units
    ]


def unit_control(
    state: ServerState, unit: ControlNetUnitRequest, where: str, seed: int, init_image: Image.Image | None
) -> Control:
    preprocessor = known_module(unit.module, f"{where}.module")
    entry = library(state).find(unit.model, f"{where}.model")
    image, mask = unit_images(state, unit, where, preprocessor, init_image)
    resize_mode = RESIZE_ALIASES.get(unit.resize_mode, unit.resize_mode)
    control = Control(
        entry.path,
        image,
        strength=unit.weight,
        start=unit.guidance_start,
        end=unit.guidance_end,
        preprocessor=preprocessor.name,
        resize_mode=resize_mode,
        control_mode=unit.control_mode,
        pixel_perfect=unit.pixel_perfect,
        processor_res=unit.processor_res if unit.processor_res > 0 else None,
        seed=seed,
        mask=mask,
        name=entry.title,
        **thresholds(preprocessor, unit.threshold_a, unit.threshold_b),
    )
    try:
        control.validate()
    except UserError as error:
        raise FieldError(where, str(error).removeprefix("Control ")) from None
    return control


def known_module(module: str, field: str) -> Preprocessor:
    try:
        return find_preprocessor(module)
    except UserError as error:
        raise FieldError(field, str(error)) from None


def thresholds(preprocessor: Preprocessor, a: float, b: float) -> dict[str, Any]:
    """The extension's threshold_a/threshold_b (negative: the default) as ``Control`` fields; canny
    takes them as its whole-number hysteresis thresholds; parameters a module lacks are ignored."""
    given = {"a": a if a >= 0 and preprocessor.threshold_a else None}
    given["b"] = b if b >= 0 and preprocessor.threshold_b else None
    if preprocessor.name == "canny":
        fields = {"low_threshold": given["a"], "high_threshold": given["b"]}
        return {name: round(value) for name, value in fields.items() if value is not None}
    return {"threshold_a": given["a"], "threshold_b": given["b"]}


def unit_images(
    state: ServerState,
    unit: ControlNetUnitRequest,
    where: str,
    preprocessor: Preprocessor,
    init_image: Image.Image | None,
) -> tuple[Image.Image | None, Image.Image | None]:
    """The unit's image and mask: its own, else (img2img) the init image; an inpaint module in an
    inpainting request gets the request's image and mask from the pipeline when it sends none."""
    source, mask_source = unit.image, unit.mask
    if isinstance(source, dict):
        source, mask_source = source.get("image"), source.get("mask") or mask_source
    limits = state.limits
    image = decode_base64_image(source, f"{where}.image", limits).convert("RGB") if source else None
    mask = decode_base64_image(mask_source, f"{where}.mask", limits).convert("L") if mask_source else None
    if image is None and not preprocessor.needs_mask:
        if init_image is None:
            raise FieldError(f"{where}.image", "is required (a base64 image; img2img uses the init image)")
        image = init_image
    return image, mask


def load_models(state: ServerState, controls: list[Control]) -> list[Control]:
    """``controls`` with their networks loaded (blocking: run it in the job)."""
    return [replace(c, model=library(state).load(Path(c.model))) for c in controls]


# ---- the extension's routes ----


@router.get("/version")
async def version() -> dict[str, int]:
    """The extension's API version whose request format is served."""
    return {"version": API_VERSION}


@router.get("/model_list")
async def model_list(request: Request, update: bool = True) -> dict[str, list[str]]:
    """The ControlNets of ``--controlnet-dir`` as ``"name [hash]"`` (read afresh each time)."""
    lib = library(server_state(request))
    return {"model_list": await asyncio.to_thread(lib.titles)}


def slider(label: str, value: float, minimum: float, maximum: float) -> dict[str, Any]:
    return {"name": label, "value": value, "min": minimum, "max": maximum}


def module_detail(preprocessor: Preprocessor) -> dict[str, Any]:
    sliders = []
    if preprocessor.resolution:
        sliders.append(slider("Resolution", 512, 64, 2048))
    for parameter in (preprocessor.threshold_a, preprocessor.threshold_b):
        if parameter is not None:
            sliders.append(slider(parameter.label, parameter.default, parameter.minimum, parameter.maximum))
    return {"model_free": True, "sliders": sliders, "needs_mask": preprocessor.needs_mask}


@router.get("/module_list")
async def module_list(alias_names: bool = False) -> dict[str, Any]:
    """The preprocessors (all weight-free; maps that need a model are supplied with ``none``)."""
    return {
        "module_list": list(PREPROCESSORS),
        "module_detail": {name: module_detail(p) for name, p in PREPROCESSORS.items()},
    }


@router.get("/settings")
async def settings(request: Request) -> dict[str, int]:
    return {"control_net_unit_count": server_state(request).limits.max_control_units}


@router.post("/detect")
async def detect(body: DetectRequest, request: Request) -> dict[str, Any]:
    """Each input image through the preprocessor, as base64 PNG (an inpaint hint: RGBA, the mask as
    alpha), as the extension's route answers."""
    state = server_state(request)
    preprocessor = known_module(body.controlnet_module, "controlnet_module")
    images, masks = body.controlnet_input_images, body.controlnet_masks
    if not images:
        raise FieldError("controlnet_input_images", "no image given: send a list of base64 images")
    if len(images) > state.limits.max_images:
        raise FieldError("controlnet_input_images", f"at most {state.limits.max_images} images are accepted")
    if preprocessor.needs_mask and len(masks) != len(images):
        raise FieldError("controlnet_masks", f"{preprocessor.name} needs one mask per input image")
    settings = {
        "preprocessor": preprocessor.name,
        "processor_res": body.controlnet_processor_res if body.controlnet_processor_res > 0 else None,
        **thresholds(preprocessor, body.controlnet_threshold_a, body.controlnet_threshold_b),
    }

    def run() -> list[str]:
        answers = []
        for i, text in enumerate(images):
            image = decode_base64_image(text, f"controlnet_input_images[{i}]", state.limits).convert("RGB")
            mask = None
            if preprocessor.needs_mask:
                mask = decode_base64_image(masks[i], f"controlnet_masks[{i}]", state.limits).convert("L")
            control = Control(None, image, mask=mask, **settings)
            try:
                control.validate()
            except UserError as error:
                raise FieldError("controlnet_module", str(error).removeprefix("Control ")) from None
            answers.append(encode_base64(hint_image(control)))
        return answers

    return {"images": await asyncio.to_thread(run), "info": "Success"}
