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
from latentdiffusion.pipelines.sampling import network_denoiser

if TYPE_CHECKING:
    from latentdiffusion.pipelines.request import Request


@dataclass(frozen=True)
class Control:
    """One ControlNet unit: ``model`` (a loaded ``ControlNet``, or a path: a diffusers ControlNet folder or
    an original single file), the hint ``image`` (a PIL image or a path; resized to the output size),
    ``strength`` (diffusers' conditioning scale), ``start``/``end`` (the part of the steps it acts on, 0..1)
    and ``guess_mode`` (diffusers' guess mode: the ControlNet sees the conditional batch only)."""

    model: ControlNet | str | Path
    image: Image.Image | str | Path
    strength: float = 1.0
    start: float = 0.0
    end: float = 1.0
    guess_mode: bool = False
    preprocessor: str | None = None  # None: the image is the hint map; "canny": its edges
    low_threshold: int = 100  # canny's hysteresis thresholds (cv2.Canny)
    high_threshold: int = 200

    def validate(self) -> None:
        if self.preprocessor is not None and self.preprocessor not in PREPROCESSORS:
            raise UserError(
                f"unknown control preprocessor {self.preprocessor!r}; known: {', '.join(PREPROCESSORS)} "
                "(maps that need a model, such as depth or pose, must be supplied as the image)"
            )
        for name in ("low_threshold", "high_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
                raise UserError(f"Control {name} must be a whole number in [0, 255], got {value!r}")
        for name in ("strength", "start", "end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"Control {name} must be a finite number, got {value!r}")
        if not 0 <= self.start < self.end <= 1:
            raise UserError(
                f"Control start and end must satisfy 0 <= start < end <= 1, got {self.start} and {self.end}"
            )
        if not isinstance(self.guess_mode, bool):
            raise UserError(f"Control guess_mode must be True or False, got {self.guess_mode!r}")


@dataclass
class ControlUnit:
    """A unit ready to run: its network, hint [1, C, H, W] in [0, 1] and settings."""

    network: ControlNet
    hint: torch.Tensor
    strength: float
    start: float
    end: float
    guess_mode: bool


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
        guided = x.shape[0] == 2 * self.batch
        rows = slice(self.batch, None) if unit.guess_mode and guided else slice(None)
        y_rows = None if y is None else y[rows] if y.shape[0] == x.shape[0] else y
        labels = class_labels
        if isinstance(labels, torch.Tensor) and labels.ndim and labels.shape[0] == x.shape[0]:
            labels = labels[rows]
        hint = unit.hint.to(x.device).expand(x[rows].shape[0], -1, -1, -1)
        down, mid = network(x[rows], t[rows], context[rows], hint, labels, y_rows)
        scales = [unit.strength] * (len(down) + 1)
        if unit.guess_mode:
            scales = (torch.logspace(-1, 0, len(down) + 1) * unit.strength).tolist()
        down = [d * s for d, s in zip(down, scales, strict=False)]
        mid = mid * scales[-1]
        if rows.start:  # guess mode under guidance: the unconditional half gets no residuals
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        return down, mid


def canny(image: Image.Image, low: int, high: int) -> Image.Image:
    """The edges OpenCV's Canny detector finds (Canny 1986), white on black, as three channels: the
    hint of canny ControlNets (as ControlNet's own ``annotator/canny`` makes it)."""
    try:
        import cv2
    except ImportError:
        raise UserError(
            "the canny preprocessor needs OpenCV: pip install 'latentdiffusion[control]' "
            "(opencv-python-headless), or supply the edge map as the image"
        ) from None
    edges = cv2.Canny(np.asarray(image.convert("RGB")), low, high)
    return Image.fromarray(np.repeat(edges[:, :, None], 3, axis=2))


# name -> (image, control) -> hint image; None (the default) is the image as given
PREPROCESSORS = {
    "none": lambda image, control: image,
    "canny": lambda image, control: canny(image, control.low_threshold, control.high_threshold),
}


def hint_image(control: Control) -> Image.Image:
    """The unit's hint map: its image, through its preprocessor (at the image's own size)."""
    from latentdiffusion.pipelines.images import load_image

    picture = load_image(control.image, "control image")
    return PREPROCESSORS[control.preprocessor or "none"](picture, control)


def hint_tensor(picture: Image.Image, width: int, height: int) -> torch.Tensor:
    """[1, 3, height, width] float32 in [0, 1]: the hint map resized (Lanczos, as diffusers' image
    processor) to the output size."""
    if picture.size != (width, height):
        picture = picture.resize((width, height), Image.Resampling.LANCZOS)
    array = np.asarray(picture, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


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

            network = load_controlnet(network)
        check_base(components, network)
        network = network.to(components.device, components.dtype).eval()
        hint = hint_tensor(hint_image(control), width, height).to(components.device, components.dtype)
        units.append(
            ControlUnit(network, hint, control.strength, control.start, control.end, control.guess_mode)
        )
    return units


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
    (``ControlNet 0: "Module: canny, Model: name, Weight: 1, ..."``); guess mode, which the extension
    has no field for, is added as ``Guess Mode: True``."""
    entries = {}
    for i, control in enumerate(controls):
        model = control.model
        name = Path(model).stem if isinstance(model, str | Path) else "ControlNet"
        fields = {"Module": control.preprocessor or "none", "Model": name, "Weight": f"{control.strength:g}"}
        if control.preprocessor == "canny":
            fields.update({"Threshold A": control.low_threshold, "Threshold B": control.high_threshold})
        fields.update({"Guidance Start": f"{control.start:g}", "Guidance End": f"{control.end:g}"})
        if control.guess_mode:
            fields["Guess Mode"] = True
        entries[f"ControlNet {i}"] = ", ".join(f"{key}: {value}" for key, value in fields.items())
    return entries
