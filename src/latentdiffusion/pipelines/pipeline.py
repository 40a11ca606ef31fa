"""``Pipeline``: the public face of a loaded model (``ld.load(...)`` returns one)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image

from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.components import Components
from latentdiffusion.pipelines.metadata import format_parameters, sampler_display_name
from latentdiffusion.pipelines.text_to_image import SamplingOptions, StepCallback, text_to_image


class Pipeline:
    """A model in memory and the operations on it; the networks stay plain torch modules."""

    def __init__(self, components: Components) -> None:
        self.components = components

    @property
    def unet(self) -> torch.nn.Module:
        return self.components.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.components.autoencoder

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.components.text_encoder

    @property
    def tokenizer(self):
        return self.components.tokenizer

    @property
    def config(self):
        return self.components.config

    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int = 20,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
        sigmas: str | None = None,
        seed: int = 0,
        num_images: int = 1,
        latents: torch.Tensor | None = None,
        eta: float | None = None,
        guidance_rescale: float = 0.0,
        callback: StepCallback | None = None,
        progress: bool = False,
    ) -> list[Image.Image]:
        """Text-to-image. Image k of prompt p has seed ``seed + p * num_images + k``.

        Each image's ``info["parameters"]`` holds its settings in the PNG-info text format.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise UserError("give at least one prompt")
        negatives = _broadcast(negative_prompt, len(prompts), "negative_prompt")
        width = width or self.config.sample_size
        height = height or self.config.sample_size
        options = SamplingOptions(steps, sampler, sigmas, guidance_scale, guidance_rescale, eta)
        all_prompts = [p for p in prompts for _ in range(num_images)]
        all_negatives = [n for n in negatives for _ in range(num_images)]
        seeds = [seed + i for i in range(len(all_prompts))]
        with _progress_bar(progress, steps, callback) as step_callback:
            images = text_to_image(
                self.components,
                all_prompts,
                all_negatives,
                width=width,
                height=height,
                seeds=seeds,
                options=options,
                latents=latents,
                callback=step_callback,
            )
        for image, p, n, s in zip(images, all_prompts, all_negatives, seeds, strict=True):
            image.info["parameters"] = self.describe(p, n, options, s, width, height)
        return images

    def describe(
        self, prompt: str, negative: str, options: SamplingOptions, seed: int, width: int, height: int
    ) -> str:
        """The PNG-info ``parameters`` text for one image."""
        settings = {
            "Steps": options.steps,
            "Sampler": sampler_display_name(options.sampler, options.sigmas),
            "CFG scale": options.guidance_scale,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": self.components.name,
        }
        if options.eta is not None:
            settings["Eta"] = options.eta
        if options.guidance_rescale:
            settings["CFG rescale"] = options.guidance_rescale
        return format_parameters(prompt, negative, settings)

    def save(self, path: str | Path, format: str = "native") -> None:
        """Write the model: ``native`` (safetensors + JSON config), ``diffusers`` or ``single-file``."""
        from latentdiffusion.pipelines.loading import save_components

        save_components(self.components, Path(path), format)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        return self


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
def _progress_bar(enabled: bool, steps: int, callback: StepCallback | None) -> Iterator[StepCallback | None]:
    """A tqdm bar over sampling steps that also forwards each step to the user's callback."""
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
