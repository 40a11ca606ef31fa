"""One request path for every ``Pipeline`` method: the options they all take (``CommonOptions``), and the
``Request`` the pipeline functions receive: prompts x images with their seeds, the sampling options with
the model's defaults filled in, the starting noise, the micro-conditioning and the step callback.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypedDict

import torch

from latentdiffusion.diffusion.guidance import SkipLayerGuidance
from latentdiffusion.diffusion.noise import randn, seeded_noise
from latentdiffusion.errors import UserError
from latentdiffusion.families import MicroConditioning
from latentdiffusion.pipelines.sampling import SamplingOptions, StepCallback, full_sigmas, model_options
from latentdiffusion.prompts import check_text

if TYPE_CHECKING:
    from latentdiffusion.components import Components
    from latentdiffusion.families.base import Cond
    from latentdiffusion.pipelines.control import Control
    from latentdiffusion.pipelines.preview import PreviewCallback
    from latentdiffusion.pipelines.prompt_conditioning import PromptConditioning


# torch's generators take seeds below 2**64; each image adds its index and a stochastic sampler an offset
MAX_SEED = 2**63 - 1


class CommonOptions(TypedDict, total=False):
    """The keyword options every ``Pipeline`` method takes besides its prompts (defaults in ``DEFAULTS``).

    - ``steps``, ``guidance_scale``, ``sampler``: unset (None), the model's defaults
      (``ModelConfig.default_*``: 20, 7.5 and "dpmpp_2m" for Stable Diffusion).
    - ``sigmas``: the noise-level discretisation, "karras" or "exponential", or a timestep spacing,
      "leading", "trailing" or "linspace"; unset, the model's (``ModelConfig.default_sigmas``, else its
      schedule's own spacing).
    - ``seed``: image k of prompt p has seed ``seed + p * num_images + k``; ``num_images`` per prompt.
    - ``eta``: DDIM's noise (0 deterministic); ``guidance_rescale``: Lin et al. 2024's rescale, 0 = off.
    - ``restart``: restart sampling (Xu et al. 2023) as ``(steps, times)`` or ``steps`` (once): before
      the last step the latent is noised back to the level ``steps`` steps earlier and those steps run
      again, ``times`` times; 0 or (0, 1) (the default) is off.
    - ``eps_scaling``: epsilon scaling (Ning et al. 2024): the guided noise estimate is divided by it at
      every step (``pipelines.sampling.eps_scaled``), 0.5 to 1.5; unset, the model's
      (``ModelConfig.default_eps_scaling``: 1, off, but for the shipped shapes model).
    - ``round_timesteps``: True feeds the network whole training timesteps, False the fractional ones
      (diffusers' Euler-family schedulers; see ``diffusion.denoiser.Denoiser``).
    - ``latents``: the unit-variance noise [N, C, H/f, W/f] in the model's latent space, one row per image,
      to reproduce a run exactly: the starting noise of text-to-image (and of inpainting at strength 1),
      the noise added to the encoded image in img2img and inpainting.
    - ``conditioning``: SDXL's size, crop and aesthetic-score conditioning (``families.MicroConditioning``;
      families without it ignore it).
    - ``control``: ControlNet units (``ld.Control``, ``pipelines.control``), applied together.
    - ``skip_layer_guidance``: ``ld.SkipLayerGuidance(layers=(7, 8, 9), scale=2.8, start=0.01,
      stop=0.2)`` (``diffusion.guidance``; SD3.5 Medium's settings), for families whose network can leave
      out blocks (SD3); its start and stop are fractions of the whole schedule's steps, so img2img and
      inpainting apply it at the same noise levels as text-to-image.
    - ``callback(step, steps, x, x0)`` after every step; ``progress``: a progress bar on stderr;
      ``preview(step, steps, images)``: approximate previews of the images each step
      (``pipelines.preview``).
    """

    steps: int | None
    guidance_scale: float | None
    sampler: str | None
    sigmas: str | None
    seed: int
    num_images: int
    eta: float | None
    guidance_rescale: float
    restart: int | tuple[int, int]
    eps_scaling: float | None
    round_timesteps: bool
    latents: torch.Tensor | None
    conditioning: MicroConditioning | None
    control: Sequence[Control] | None
    skip_layer_guidance: SkipLayerGuidance | None
    callback: StepCallback | None
    progress: bool
    preview: PreviewCallback | None


DEFAULTS: dict[str, Any] = {
    "steps": None,
    "guidance_scale": None,
    "sampler": None,
    "sigmas": None,
    "seed": 0,
    "num_images": 1,
    "eta": None,
    "guidance_rescale": 0.0,
    "restart": 0,
    "eps_scaling": None,
    "round_timesteps": True,
    "latents": None,
    "conditioning": None,
    "control": None,
    "skip_layer_guidance": None,
    "callback": None,
    "progress": False,
    "preview": None,
}


def common_options(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every common option: those ``given`` to ``method``, the defaults for the rest. An unknown name is
    the TypeError Python raises for any unexpected keyword argument."""
    unknown = sorted(set(given) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"{method}() got an unexpected keyword argument {unknown[0]!r}")
    return {**DEFAULTS, **given}


def restart_option(value: Any) -> tuple[int, int]:
    """``restart`` as (steps, times): a whole number is the steps of one restart; None is off."""
    if value is None:
        return (0, 1)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return (int(value), 1)
    if isinstance(value, tuple | list) and len(value) == 2:
        return (value[0], value[1])
    raise UserError(f"restart must be STEPS or (STEPS, TIMES), got {value!r}")


@dataclass(frozen=True)
class Request:
    """One call, expanded: image i has ``prompts[i]``, ``negative_prompts[i]`` and ``seeds[i]``."""

    prompts: list[str]
    negative_prompts: list[str]
    seeds: list[int]
    options: SamplingOptions
    latents: torch.Tensor | None = None
    micro: MicroConditioning | None = None
    callback: StepCallback | None = None
    control: tuple[Control, ...] = ()
    # a hires-fix second pass: the first pass's steps, for prompt editing's second-pass rule
    first_pass_steps: int | None = None

    def conditioning(
        self, components: Components, width: int, height: int
    ) -> tuple[Cond, Cond] | tuple[PromptConditioning, PromptConditioning]:
        """(cond, uncond) for guidance, as the model's family makes them for an image of this size.

        Prompts with AUTOMATIC1111's prompt editing, alternation or ``AND`` (``prompt_schedule``) give
        one ``PromptConditioning`` for both sides instead (``pipelines.sampling.guide`` takes either);
        other prompts take this plain path unchanged."""
        from latentdiffusion.pipelines.prompt_conditioning import prompt_conditioning, uses_prompt_syntax
        from latentdiffusion.pipelines.text_to_image import encode_conditioning

        if uses_prompt_syntax(self.prompts, self.negative_prompts):
            scheduled = prompt_conditioning(components, self, width, height)
            return scheduled, scheduled
        # unguided sampling never reads the unconditional side: the prompts stand in for the negative
        # prompts, which the families then do not encode a second time
        negatives = self.prompts if self.unguided() else self.negative_prompts
        return encode_conditioning(components, self.prompts, negatives, width, height, self.micro)

    def unguided(self) -> bool:
        """Whether sampling runs the conditional pass alone: guidance scale 1, or an LCM-distilled model's
        guidance embedding (``sampling.guide``)."""
        return self.options.guidance_scale == 1 or self.options.guidance_embedding is not None

    def has_prompt_syntax(self) -> bool:
        """Whether a prompt uses prompt editing, alternation or ``AND`` (``conditioning`` then gives a
        ``PromptConditioning``): for pipelines that need plain (cond, uncond) dicts to refuse it."""
        from latentdiffusion.pipelines.prompt_conditioning import uses_prompt_syntax

        return uses_prompt_syntax(self.prompts, self.negative_prompts)

    def noise(
        self,
        shape: Sequence[int],
        device: torch.device,
        generators: Sequence[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Unit-variance noise of ``shape`` (float32): ``latents`` as given; else sample i drawn from
        ``generators[i]`` (after what it drew before) if given, else from one seeded ``seeds[i]``."""
        if self.latents is not None:
            if tuple(self.latents.shape) != tuple(shape):
                raise UserError(f"latents must have shape {list(shape)}, got {list(self.latents.shape)}")
            return self.latents.to(device=device, dtype=torch.float32)
        if generators is not None:
            return randn(shape, list(generators), device, torch.float32)
        return seeded_noise(shape, self.seeds, device=device, dtype=torch.float32)


def make_request(
    components: Components,
    prompt: str | Sequence[str],
    negative_prompt: str | Sequence[str] | None,
    options: Mapping[str, Any],
    callback: StepCallback | None,
) -> Request:
    """Prompts x ``num_images`` with consecutive seeds, and the sampling options with the model's defaults."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise UserError("give at least one prompt")
    num_images = options["num_images"]
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise UserError(f"num_images must be a whole number >= 1, got {num_images!r}")
    seed = options["seed"]
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise UserError(f"seed must be a whole number, got {seed!r}")
    if not -MAX_SEED - 1 <= seed <= MAX_SEED:
        raise UserError(f"seed must be at most {MAX_SEED} (2**63 - 1) in size, got {seed}")
    negatives = _broadcast(negative_prompt, len(prompts), "negative_prompt")
    for text in prompts:
        check_text(text)
    for text in negatives:
        check_text(text, "the negative prompt")
    sampling = model_options(
        components.config,
        options["steps"],
        options["sampler"],
        options["sigmas"],
        options["guidance_scale"],
        options["guidance_rescale"],
        options["eta"],
        round_timesteps=options["round_timesteps"],
        restart=restart_option(options["restart"]),
        eps_scaling=options["eps_scaling"],
    )
    sampling.validate()
    slg = _skip_layer_guidance(components, sampling, options["skip_layer_guidance"])
    sampling = replace(sampling, skip_layer_guidance=slg)
    return Request(
        prompts=[p for p in prompts for _ in range(num_images)],
        negative_prompts=[n for n in negatives for _ in range(num_images)],
        seeds=[int(seed) + i for i in range(len(prompts) * num_images)],
        options=sampling,
        latents=options["latents"],
        micro=options["conditioning"],
        callback=callback,
        control=_controls(options["control"]),
    )


def _skip_layer_guidance(
    components: Components, options: SamplingOptions, slg: Any
) -> SkipLayerGuidance | None:
    """``slg`` checked against the model and placed on its schedule's noise levels (``for_schedule``);
    None when it is not given or acts on no step (no guided step: guidance scale 1)."""
    if slg is None:
        return None
    if not isinstance(slg, SkipLayerGuidance):
        raise UserError(f"skip_layer_guidance takes ld.SkipLayerGuidance(...), got {type(slg).__name__}")
    slg.validate()
    blocks = components.family.skip_layer_blocks(components.config)
    if not blocks:
        raise UserError(
            f"skip-layer guidance needs a transformer whose blocks can be left out (SD3); model "
            f"{components.name!r} ({components.family.description}) has none"
        )
    outside = [i for i in slg.layers if i >= blocks]
    if outside:
        raise UserError(
            f"skip-layer guidance layers {outside} are not blocks of model {components.name!r} "
            f"(0..{blocks - 1})"
        )
    if options.guidance_scale == 1:
        return None
    return slg.for_schedule(full_sigmas(components, options))


def _controls(control: Any) -> tuple[Control, ...]:
    """``control`` as a tuple of units: None, one ``ld.Control`` or a sequence of them."""
    if control is None:
        return ()
    from latentdiffusion.pipelines.control import Control

    if isinstance(control, Control):
        return (control,)
    if not isinstance(control, list | tuple):
        raise UserError(f"control takes ld.Control(...) units, got {type(control).__name__}")
    units = tuple(control)
    for unit in units:
        if not isinstance(unit, Control):
            raise UserError(f"control takes ld.Control(...) units, got {type(unit).__name__}")
        unit.validate()
    return units


def _broadcast(value: str | Sequence[str] | None, n: int, name: str) -> list[str]:
    if value is None:
        return [""] * n
    if isinstance(value, str):
        return [value] * n
    values = list(value)
    if len(values) != n:
        raise UserError(f"{name} has {len(values)} entries for {n} prompts")
    return values


@contextmanager
def progress_bar(enabled: bool, steps: int, callback: StepCallback | None) -> Iterator[StepCallback | None]:
    """A tqdm bar over sampling steps that also forwards each step to ``callback``."""
    if not enabled:
        yield callback
        return
    from tqdm import tqdm

    with tqdm(total=steps, desc="sampling", unit="step", leave=False) as bar:

        def on_step(step: int, total: int, x: torch.Tensor, x0: torch.Tensor) -> None:
            bar.total = total
            bar.update(1)
            if callback is not None:
                callback(step, total, x, x0)

        yield on_step
