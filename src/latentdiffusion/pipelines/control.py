"""ControlNet around the U-Net (Zhang, Rao & Agrawala 2023): ``Control`` units and ``ControlledUNet``.

The wrapper runs each unit's ControlNet on the same (x, t, context, y) the U-Net gets, plus the unit's
hint, and hands the summed residuals to ``UNet.forward(down_residuals=, mid_residual=)``; samplers and
classifier-free guidance stay untouched (the guided batch is [uncond, cond], so the hint is repeated for
both halves). As diffusers' ``StableDiffusionControlNetPipeline`` does:

- strength scales a unit's residuals (``controlnet_conditioning_scale``);
- start/end (fractions of the run's steps) keep a unit on step i of n only when
  ``start <= i / n`` and ``(i + 1) / n <= end`` (diffusers' ``controlnet_keep``); the wrapper finds the
  step from the network timestep of the call among the run's timesteps;
- guess mode runs the ControlNet on the conditional half only (the unconditional half gets no
  residuals) and scales the residuals of block k of K by ``logspace(-1, 0, K + 1)[k]``, the middle by 1.

And as AUTOMATIC1111's ControlNet extension does, the control modes ("My prompt is more important":
per-block soft weights; "ControlNet is more important": soft weights on the conditional half only) and
the hint's preprocessing and resize modes (``pipelines.preprocessors``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.models.controlnet import ControlNet
from latentdiffusion.pipelines.preprocessors import (
    RESIZE_MODES,
    Inputs,
    at_resolution,
    find_preprocessor,
    fit_hint,
    parameter_value,
    pixel_perfect_resolution,
)
from latentdiffusion.pipelines.sampling import network_denoiser

if TYPE_CHECKING:
    from latentdiffusion.pipelines.request import Request


CONTROL_MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")
SOFT_WEIGHT = 0.825  # the extension's per-block decay for the two non-balanced control modes


SHORT_NAMES = {  # what the CLI also takes: a word per option
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "controlnet": "ControlNet is more important",
    "resize": "Just Resize",
    "crop": "Crop and Resize",
    "fill": "Resize and Fill",
}


def option_name(value: object, names: Sequence[str], what: str) -> str:
    """One of ``names`` from itself (any case), its index (the extension's API numbers them 0, 1, 2) or
    its word in ``SHORT_NAMES``."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return names[value]
    if isinstance(value, str):
        text = value.strip().lower()
        for name in names:
            if text in (name.lower(), str(names.index(name))) or SHORT_NAMES.get(text) == name:
                return name
    known = ", ".join(f"{name!r} ({i})" for i, name in enumerate(names))
    raise UserError(f"unknown {what} {value!r}; use one of {known}")


@dataclass(frozen=True)
class Control:
    """One ControlNet unit: ``model`` (a loaded ``ControlNet``, or a path: a diffusers ControlNet folder or
    an original single file), the hint ``image`` (a PIL image or a path), ``strength`` (diffusers'
    conditioning scale, the extension's weight), ``start``/``end`` (the part of the steps it acts on,
    0..1) and ``guess_mode`` (diffusers' guess mode: the ControlNet sees the conditional batch only).

    The image goes through ``preprocessor`` (``pipelines.preprocessors``; None or "none": it is the hint
    map) at ``processor_res`` (its shorter side; None: its own size) or, with ``pixel_perfect``, at the
    output's scale; then it is fitted to the output size by ``resize_mode`` ("Just Resize", "Crop and
    Resize" (default), "Resize and Fill"). ``threshold_a``/``threshold_b`` are the preprocessor's
    parameters (None: its defaults; canny's are ``low_threshold``/``high_threshold``), ``seed`` seeds
    shuffle, ``mask`` (white = repainted) feeds the inpaint preprocessor. ``control_mode`` is the
    extension's: "Balanced", "My prompt is more important", "ControlNet is more important"
    (``ControlUnit.scales``)."""

    model: ControlNet | str | Path
    image: Image.Image | str | Path | None  # None: the inpainting's image (inpaint preprocessors)
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocessor: str | None = None
    low_threshold: int = 100  # canny's hysteresis thresholds (cv2.Canny)
    high_threshold: int = 200
    threshold_a: float | None = None
    threshold_b: float | None = None
    resize_mode: str | int = "Crop and Resize"
    control_mode: str | int = "Balanced"
    pixel_perfect: bool = False
    processor_res: int | None = None
    seed: int = 0
    mask: Image.Image | str | Path | None = None
    name: str | None = None  # the model's name in PNG info (None: its file's stem)

    def validate(self) -> None:
        find_preprocessor(self.preprocessor)
        for name in ("low_threshold", "high_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise UserError(f"Control {name} must be a whole number in [0, 255], got {value!r}")
        for name in ("strength", "start", "end", "threshold_a", "threshold_b"):
            value = getattr(self, name)
            if value is None and name.startswith("threshold"):
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"Control {name} must be a finite number, got {value!r}")
        if not 0 <= self.start < self.end <= 1:
            raise UserError(
                f"Control start and end must satisfy 0 <= start < end <= 1, got {self.start} and {self.end}"
            )
        for name in ("guess_mode", "pixel_perfect"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"Control {name} must be True or False, got {getattr(self, name)!r}")
        res = self.processor_res
        if res is not None and (isinstance(res, bool) or not isinstance(res, int) or not 1 <= res <= 8192):
            raise UserError(f"Control processor_res must be a whole number in [1, 8192], got {res!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise UserError(f"Control seed must be a whole number, got {self.seed!r}")
        _, control_mode = self.modes  # checks both names
        if self.guess_mode and control_mode != "Balanced":
            raise UserError(
                "Control guess_mode (diffusers) and a control_mode other than 'Balanced' (the A1111 "
                "extension's) are two ways of saying the same thing: give one of them"
            )
        self.parameters()

    @property
    def modes(self) -> tuple[str, str]:
        """(resize mode, control mode) by their full names."""
        return (
            option_name(self.resize_mode, RESIZE_MODES, "resize mode"),
            option_name(self.control_mode, CONTROL_MODES, "control mode"),
        )

    def parameters(self) -> tuple[float, float]:
        """The preprocessor's two parameters as it will use them (defaults filled in, ranges checked)."""
        found = find_preprocessor(self.preprocessor)
        if found.name == "canny":
            return float(self.low_threshold), float(self.high_threshold)
        a = parameter_value(found.threshold_a, self.threshold_a, "threshold_a", found.name)
        b = parameter_value(found.threshold_b, self.threshold_b, "threshold_b", found.name)
        return a, b


@dataclass
class ControlUnit:
    """A unit ready to run: its network, hint [1, C, H, W] (in [0, 1]; an inpaint hint has -1 where
    masked), strength, window and control mode (``guess_mode`` is diffusers' own)."""

    network: ControlNet
    hint: torch.Tensor
    strength: float
    start: float
    end: float
    guess_mode: bool = False
    control_mode: str = "Balanced"

    @property
    def conditional_only(self) -> bool:
        """Residuals for the conditional half of a guided batch only (the unconditional half gets none),
        so guidance amplifies the control: diffusers' guess mode, the extension's "ControlNet is more
        important" (its ``cfg_injection``)."""
        return self.guess_mode or self.control_mode == CONTROL_MODES[2]

    def scales(self, count: int) -> list[float]:
        """The factors of the ``count`` residuals (down blocks in order, then the middle block):

        - Balanced: ``strength`` for every one;
        - guess mode (diffusers): ``strength * logspace(-1, 0, count)[k]``, 0.1 for the first to 1;
        - the extension's two other modes (its ``soft_injection``): ``strength * 0.825 ** (12 - k)``
          for the k-th residual, k = 0..count-1. SD 1.x/2.x have 13 (the middle one gets 1); the
          extension keeps the first 10 of its 13 weights for SDXL's 10, so SDXL's middle block gets
          0.825 ** 3 -- as here.
        """
        if self.guess_mode:
            return (torch.logspace(-1, 0, count) * self.strength).tolist()  # float32, as diffusers
        if self.control_mode == CONTROL_MODES[0]:
            return [self.strength] * count
        return [self.strength * SOFT_WEIGHT ** float(12 - k) for k in range(count)]


class ControlledUNet(nn.Module):
    """``unet`` with the residuals of ``units`` added; ``timesteps`` are the network timesteps of the run's
    steps (descending), ``batch`` the number of images (the guided batch holds 2 * batch rows)."""

    def __init__(self, unet: nn.Module, units: Sequence[ControlUnit], timesteps: torch.Tensor, batch: int):
        super().__init__()
        self.unet = unet
        self.units = list(units)
        self.timesteps = timesteps.float().cpu()
        self.batch = batch

    @property
    def config(self):
        return self.unet.config

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        context: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        step = self.step_index(t)
        down, mid = None, None
        for unit in self.units:
            if not self.active(unit, step):
                continue
            d, m = self._residuals(unit, x, t, context, class_labels, y)
            down = d if down is None else [a + b for a, b in zip(down, d, strict=True)]
            mid = m if mid is None else mid + m
        return self.unet(x, t, context, class_labels, y=y, down_residuals=down, mid_residual=mid)

    def step_index(self, t: torch.Tensor | float) -> int:
        """The run's step a call belongs to: the number of run timesteps above the call's."""
        t_now = float(torch.as_tensor(t).float().max())
        return int((self.timesteps > t_now + 1e-3).sum())

    def active(self, unit: ControlUnit, step: int) -> bool:
        n = len(self.timesteps)
        return not (step / n < unit.start or (step + 1) / n > unit.end)

    def _residuals(self, unit, x, t, context, class_labels, y):
        network = unit.network
        x = x[
            :, : network.config.in_channels
        ]  # an inpainting U-Net's concat channels are not the ControlNet's
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        guided = x.shape[0] > self.batch  # uncond rows first, then one row per image or AND part
        rows = slice(self.batch, None) if unit.conditional_only and guided else slice(None)
        y_rows = None if y is None else y[rows] if y.shape[0] == x.shape[0] else y
        labels = class_labels
        if isinstance(labels, torch.Tensor) and labels.ndim and labels.shape[0] == x.shape[0]:
            labels = labels[rows]
        hint = unit.hint.to(x.device).expand(x[rows].shape[0], -1, -1, -1)
        down, mid = network(x[rows], t[rows], context[rows], hint, labels, y_rows)
        scales = unit.scales(len(down) + 1)
        down = [d * s for d, s in zip(down, scales, strict=False)]
        mid = mid * scales[-1]
        if rows.start:  # conditional half only: the unconditional half gets no residuals
            down = [torch.cat([d.new_zeros((self.batch, *d.shape[1:])), d]) for d in down]
            mid = torch.cat([mid.new_zeros((self.batch, *mid.shape[1:])), mid])
        return down, mid


def hint_array(control: Control, width: int | None = None, height: int | None = None) -> np.ndarray:
    """The unit's hint map [H, W, 3] uint8 (inpaint: [H, W, 4], the mask last) at its preprocessing
    size: its image through its preprocessor, run at ``processor_res`` (or, with ``pixel_perfect``
    and an output size, the output's scale) when the preprocessor has a resolution."""
    from latentdiffusion.pipelines.images import load_image

    preprocessor = find_preprocessor(control.preprocessor)
    if control.image is None:
        raise UserError(
            "Control image is missing (only an inpaint preprocessor in inpainting may leave it out: it "
            "then takes the image being inpainted)"
        )
    image = np.asarray(load_image(control.image, "control image").convert("RGB"))
    mask = None
    if control.mask is not None:
        mask = np.asarray(load_image(control.mask, "control mask").convert("L"))
    resolution = control.processor_res
    if control.pixel_perfect and width and height:
        resolution = pixel_perfect_resolution(image.shape[1::-1], width, height, control.modes[0])
    if preprocessor.resolution and resolution:
        image = at_resolution(image, resolution)
    a, b = control.parameters()
    return preprocessor.run(image, Inputs(a, b, control.seed, mask))


def hint_image(control: Control, width: int | None = None, height: int | None = None) -> Image.Image:
    """``hint_array`` as a PIL image (RGBA for an inpaint hint): what ``/controlnet/detect`` answers."""
    return Image.fromarray(hint_array(control, width, height))


def hint_tensor(hint: np.ndarray, width: int, height: int, resize_mode: str) -> torch.Tensor:
    """[1, 3, height, width] float32: the hint fitted to the output (``fit_hint``) in [0, 1]; for an
    inpaint hint (four channels) the image with masked pixels set to -1."""
    fitted = fit_hint(hint, width, height, resize_mode).astype(np.float32) / 255.0
    tensor = torch.from_numpy(fitted).permute(2, 0, 1)[None].contiguous()
    if tensor.shape[1] == 4:
        colour, masked = tensor[:, :3], (tensor[:, 3:] > 0.5).float()
        tensor = colour * (1 - masked) - masked
    return tensor


def with_inpaint_inputs(request: Request, image: Image.Image, mask: Image.Image, invert: bool) -> Request:
    """``request`` with the inpainting's ``image`` and ``mask`` (white = repainted; ``invert``: black)
    given to the units whose preprocessor needs a mask (an inpaint ControlNet's hint) and lack them."""
    from dataclasses import replace

    if not any(find_preprocessor(c.preprocessor).needs_mask for c in request.control):
        return request
    if invert:
        from PIL import ImageOps

        mask = ImageOps.invert(mask.convert("L"))
    units = []
    for c in request.control:
        if find_preprocessor(c.preprocessor).needs_mask:
            c = replace(
                c, image=image if c.image is None else c.image, mask=mask if c.mask is None else c.mask
            )
        units.append(c)
    return replace(request, control=tuple(units))


def prepare_units(
    components: Components, controls: Sequence[Control], width: int, height: int
) -> list[ControlUnit]:
    units = []
    for control in controls:
        if not isinstance(control, Control):
            raise UserError(f"control takes ld.Control(...) units, got {type(control).__name__}")
        control.validate()
        network = control.model
        if not isinstance(network, ControlNet):
            from latentdiffusion.checkpoints.controlnet import load_controlnet

            network = load_controlnet(shipped_controlnet(network))
        check_base(components, network)
        network = network.to(components.device, components.dtype).eval()
        hint = hint_tensor(hint_array(control, width, height), width, height, control.modes[0])
        hint = hint.to(components.device, components.dtype)
        settings = (control.strength, control.start, control.end, control.guess_mode, control.modes[1])
        units.append(ControlUnit(network, hint, *settings))
    return units


SHIPPED_CONTROLNETS = {"layout": "layout-controlnet"}  # name -> folder under the package's data/


def shipped_controlnet(model: str | Path) -> str | Path:
    """The folder of a ControlNet shipped in the package when ``model`` is its name ("layout": the
    default model's layout-to-image ControlNet) and no file or folder of that name exists; else ``model``."""
    name = str(model)
    if name not in SHIPPED_CONTROLNETS or Path(name).exists():
        return model
    from latentdiffusion.pipelines.loading import shipped_model_dir

    folder = shipped_model_dir(SHIPPED_CONTROLNETS[name])
    if not (folder / "config.json").is_file():
        raise UserError(f"the {name} ControlNet is not installed; pass a ControlNet folder or file instead")
    return folder


def check_base(components: Components, network: ControlNet) -> None:
    """A ControlNet works only with the U-Net family it was trained beside: same text-state width and
    vector conditioning (SD 1.x: 768 wide; SD 2.x: 1024; SDXL: 2048 with a 2816-wide y)."""
    ours, theirs = components.config.unet, network.config
    if (ours.context_dim, ours.adm_in_channels, ours.model_channels) != (
        theirs.context_dim,
        theirs.adm_in_channels,
        theirs.model_channels,
    ):
        raise UserError(
            f"this ControlNet was made for another base model (text width {theirs.context_dim}, vector "
            f"conditioning {theirs.adm_in_channels}, {theirs.model_channels} channels) than "
            f"{components.name!r} (text width {ours.context_dim}, vector conditioning "
            f"{ours.adm_in_channels}, {ours.model_channels} channels): use a ControlNet made for "
            "this model's family"
        )


def controlled(
    components: Components,
    request: Request,
    sigmas: torch.Tensor,
    width: int,
    height: int,
) -> Components:
    """``components`` with its U-Net wrapped in a ``ControlledUNet`` for a run over ``sigmas`` (the steps
    actually run: after img2img's strength cut, as diffusers counts them); unchanged without controls."""
    if not request.control:
        return components
    units = prepare_units(components, request.control, width, height)
    timesteps = network_denoiser(components, request.options).timestep(sigmas[:-1].float())
    unet = ControlledUNet(components.unet, units, timesteps, len(request.seeds))
    return components.with_modules(unet=unet)


def control_parameters(controls: Sequence[Control]) -> dict[str, str]:
    """PNG-info entries for the units, as AUTOMATIC1111's ControlNet extension writes them
    (``ControlNet 0: "Module: canny, Model: name, Weight: 1, Resize Mode: Crop and Resize, ..."``, its
    field order); Processor Res only when set, Threshold A/B only for preprocessors that have them;
    guess mode, which the extension has no field for, is added as ``Guess Mode: True``."""
    entries = {}
    for i, control in enumerate(controls):
        model = control.model
        name = control.name or (Path(model).stem if isinstance(model, str | Path) else "ControlNet")
        preprocessor = find_preprocessor(control.preprocessor)
        resize_mode, control_mode = control.modes
        fields = {"Module": preprocessor.name, "Model": name, "Weight": f"{control.strength:g}"}
        fields["Resize Mode"] = resize_mode
        if control.processor_res is not None and preprocessor.resolution:
            fields["Processor Res"] = control.processor_res
        a, b = control.parameters()
        if preprocessor.threshold_a is not None:
            fields["Threshold A"] = f"{a:g}"
        if preprocessor.threshold_b is not None:
            fields["Threshold B"] = f"{b:g}"
        fields.update({"Guidance Start": f"{control.start:g}", "Guidance End": f"{control.end:g}"})
        fields.update({"Pixel Perfect": control.pixel_perfect, "Control Mode": control_mode})
        if control.guess_mode:
            fields["Guess Mode"] = True
        entries[f"ControlNet {i}"] = ", ".join(f"{key}: {value}" for key, value in fields.items())
    return entries
