"""Latent walks: frames that move from one (prompt, seed) keyframe to the next.

Between consecutive keyframes A and B, frame t (t = i / frames, i = 0 .. frames - 1) is generated from

- the text conditioning interpolated linearly, every tensor of the family's cond dict (the text
  encoder's states; SDXL's and SD3's pooled vectors too) and of the uncond dict: (1 - t) c_A + t c_B. A
  and B are encoded together, as a batch, so a prompt with fewer 75-token chunks is padded to the
  longer one's with empty chunks (as every batch of prompts is, ``prompts.encode_prompt_pair``);
- the starting noise interpolated on the sphere (slerp, Shoemake 1985; ``diffusion.noise.slerp``)
  between the seeds' noises, which keeps it at the norm of unit-variance noise where a straight line
  would shrink it (to 1/sqrt(2) at t = 1/2 for independent draws): the same noise as
  ``generate(variation_seed=B's seed, variation_strength=t)`` with A's seed.

Frame t = 0 of each segment, and the walk's last frame, is the keyframe itself, made exactly as
``Pipeline.generate(prompt, seed=seed)`` makes it: the end frames equal the stills. A walk with
``frames`` per segment over K keyframes has (K - 1) * frames + 1 frames.

Stochastic samplers (ancestral, SDE) draw fresh noise at every step from the seed's stream; an
in-between frame draws from its nearer keyframe's seed, so such walks jump at each segment's middle.
Deterministic samplers (the default DPM++ 2M, DDIM with eta 0, Euler, Heun, UniPC, ...) walk smoothly.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from latentdiffusion.diffusion.noise import seeded_noise, variation_noise
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.request import MAX_SEED, Request, common_options, make_request

if TYPE_CHECKING:
    from latentdiffusion.components import Components
    from latentdiffusion.families.base import Cond
    from latentdiffusion.pipelines.pipeline import Pipeline

FrameCallback = Callable[[int, Image.Image], None]  # (frame index from 0, the frame with its PNG info)
WALK_OWN_OPTIONS = ("seed", "num_images", "latents")  # a walk sets these per frame itself


@dataclass(frozen=True)
class WalkPoint:
    """Where a frame lies: ``t`` (0 <= t < 1) of the way from keyframe ``segment`` to the next one."""

    segment: int
    t: float

    @property
    def position(self) -> float:
        """Keyframe index plus fraction: 1.25 is a quarter of the way from keyframe 1 to keyframe 2."""
        return self.segment + self.t


def walk_points(keyframes: int, frames: int) -> list[WalkPoint]:
    """``frames`` points per segment starting at its keyframe, then the last keyframe."""
    inner = [WalkPoint(k, i / frames) for k in range(keyframes - 1) for i in range(frames)]
    return [*inner, WalkPoint(keyframes - 1, 0.0)]


def keyframes(prompts: str | Sequence[str], seeds: int | Sequence[int]) -> tuple[list[str], list[int]]:
    """(prompts, seeds) of each keyframe: one prompt or one seed serves every keyframe (a seed walk, a
    prompt walk); otherwise there is one of each per keyframe. At least two keyframes."""
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    seed_list = [seeds] if isinstance(seeds, numbers.Integral) else list(seeds)
    for seed in seed_list:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= MAX_SEED:
            raise UserError(f"seeds must be whole numbers from 0 to {MAX_SEED}, got {seed!r}")
    count = max(len(prompt_list), len(seed_list))
    if len(prompt_list) not in (1, count) or len(seed_list) not in (1, count):
        raise UserError(
            f"a walk takes one seed per prompt (or one seed for all): got {len(prompt_list)} prompts "
            f"and {len(seed_list)} seeds"
        )
    if count < 2:
        raise UserError("a walk needs at least two keyframes: two prompts, or one prompt and two seeds")
    prompt_list = prompt_list * (count // len(prompt_list))
    return prompt_list, [int(seed) for seed in seed_list] * (count // len(seed_list))


def interpolate_cond(a: Cond, b: Cond, t: float) -> Cond:
    """Every tensor of a cond dict, (1 - t) a + t b, computed in float32 and kept in a's dtype."""
    if a.keys() != b.keys():
        raise ValueError(f"cond dicts with different entries: {sorted(a)} and {sorted(b)}")
    return {key: torch.lerp(a[key].float(), b[key].float(), t).to(a[key].dtype) for key in a}


class Segments:
    """Each segment's cond and uncond pairs, encoded once per model (the model's, and a refiner's with
    text encoders of its own) when its first in-between frame needs them."""

    def __init__(self, keys: Request, width: int, height: int) -> None:
        self.keys, self.width, self.height = keys, width, height
        self.encoded: dict[tuple[int, ...], tuple[Cond, Cond]] = {}

    def conditioning(self, point: WalkPoint, components: Components) -> tuple[Cond, Cond]:
        """(cond, uncond) at ``point`` for ``components``' text encoders, from the two keyframes encoded
        as one batch of two."""
        encoders = tuple(id(components.modules.get(role)) for role in components.family.text_roles)
        key = (point.segment, *encoders)
        if key not in self.encoded:
            pair = slice(point.segment, point.segment + 2)
            request = replace(
                self.keys, prompts=self.keys.prompts[pair], negative_prompts=self.keys.negative_prompts[pair]
            )
            self.encoded[key] = request.conditioning(components, self.width, self.height)
        cond, uncond = self.encoded[key]
        return tuple(interpolate_cond(_row(c, 0), _row(c, 1), point.t) for c in (cond, uncond))


@dataclass(frozen=True)
class ConditionedRequest(Request):
    """A request whose (cond, uncond) are interpolated between two keyframes' instead of encoded from its
    prompts, by whichever model (the model or its refiner) asks."""

    segments: Segments | None = None
    point: WalkPoint | None = None

    def conditioning(self, components: Components, width: int, height: int) -> tuple[Cond, Cond]:
        return self.segments.conditioning(self.point, components)


def _row(cond: Cond, i: int) -> Cond:
    return {key: value[i : i + 1] for key, value in cond.items()}


def frame_request(keys: Request, segments: Segments, point: WalkPoint, shape: Sequence[int]) -> Request:
    """The request of one frame: at a keyframe, the keyframe's own (``generate``'s); in between, the
    interpolated conditioning and noise, the sampler's noise from the nearer keyframe's seed."""
    k = point.segment
    if point.t == 0:
        one = slice(k, k + 1)
        return replace(
            keys,
            prompts=keys.prompts[one],
            negative_prompts=keys.negative_prompts[one],
            seeds=keys.seeds[one],
        )
    start, end = keys.seeds[k], keys.seeds[k + 1]
    noise = variation_noise(shape, [start], end, point.t) if start != end else seeded_noise(shape, [start])
    return ConditionedRequest(
        prompts=keys.prompts[k : k + 1],
        negative_prompts=keys.negative_prompts[k : k + 1],
        seeds=[start if point.t < 0.5 else end],
        options=keys.options,
        latents=noise,
        micro=keys.micro,
        callback=keys.callback,
        control=keys.control,
        segments=segments,
        point=point,
    )


def frame_settings(keys: Request, point: WalkPoint, index: int, total: int) -> dict[str, Any]:
    """The PNG-info settings of a walk frame besides the common ones: its place in the walk and, in
    between keyframes, where it goes (the next prompt; the next seed as the web UI's variation seed,
    which reproduces the frame's starting noise)."""
    settings: dict[str, Any] = {"Walk frame": f"{index + 1}/{total}", "Walk position": f"{point.position:g}"}
    if point.t == 0:
        return settings
    k = point.segment
    if keys.prompts[k + 1] != keys.prompts[k] or keys.negative_prompts[k + 1] != keys.negative_prompts[k]:
        settings["Walk to"] = keys.prompts[k + 1]
        if keys.negative_prompts[k + 1] != keys.negative_prompts[k]:
            settings["Walk to negative"] = keys.negative_prompts[k + 1]
    if keys.seeds[k + 1] != keys.seeds[k]:
        settings.update({"Variation seed": keys.seeds[k + 1], "Variation seed strength": point.t})
    return settings


def walk(
    pipe: Pipeline,
    prompts: str | Sequence[str],
    seeds: int | Sequence[int],
    frames: int,
    negative_prompt: str | Sequence[str] | None,
    width: int | None,
    height: int | None,
    given: Mapping[str, Any],
    on_frame: FrameCallback | None = None,
) -> list[Image.Image]:
    """The frames of a walk (see the module's docstring); ``given``: ``generate``'s common options
    except seed, num_images and latents. ``on_frame(i, frame)`` is called as each frame is done."""
    from latentdiffusion.pipelines.preview import with_preview
    from latentdiffusion.pipelines.text_to_image import (
        latent_shape,
        refiner_pass,
        require_text_to_image_model,
        text_to_image,
        validate_size,
    )
    from latentdiffusion.pipelines.vae_tiling import with_tiled_autoencoder

    own = [name for name in WALK_OWN_OPTIONS if name in given]
    if own:
        raise UserError(f"walk() sets {own[0]} itself for each frame: give seeds= (one per keyframe) instead")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise UserError(f"frames (per segment) must be a whole number >= 1, got {frames!r}")
    key_prompts, key_seeds = keyframes(prompts, seeds)
    components = pipe.components
    width, height = width or components.config.sample_size, height or components.config.sample_size
    validate_size(components, width, height, 1)
    require_text_to_image_model(components)
    options = common_options("walk", given)
    callback = with_preview(components, options["callback"], options["preview"])
    keys = replace(make_request(components, key_prompts, negative_prompt, options, callback), seeds=key_seeds)
    tiled = with_tiled_autoencoder(pipe.served())  # as generate: the backend's U-Net, tiled decoding
    refiner, refined = refiner_pass(pipe, None, None, bool(keys.control))  # and the bundled refiner
    segments = Segments(keys, width, height)
    shape = latent_shape(components, 1, width, height)
    points = walk_points(len(key_seeds), frames)
    images = []
    with torch.inference_mode(), frame_bar(options["progress"], len(points)) as advance:
        for i, point in enumerate(points):
            request = frame_request(keys, segments, point, shape)
            (image,) = text_to_image(tiled, request, width=width, height=height, refiner=refiner)
            place = (i, len(points))
            image.info["parameters"] = frame_parameters(pipe, keys, request, point, place, image, refined)
            images.append(image)
            if on_frame is not None:
                on_frame(i, image)
            advance()
    return images


def frame_parameters(
    pipe: Pipeline,
    keys: Request,
    request: Request,
    point: WalkPoint,
    place: tuple[int, int],
    image: Image.Image,
    refined: dict[str, Any],
) -> str:
    """The PNG-info text of a walk frame: the settings of its segment's first keyframe (prompt, negative
    prompt, seed), then those ``generate`` adds (a refiner: ``refined``; ControlNet, SDXL conditioning)
    and ``frame_settings``."""
    extra = {**refined, **frame_settings(keys, point, *place)}
    if request.control:
        from latentdiffusion.pipelines.control import control_parameters

        extra.update(control_parameters(request.control))
    if request.micro is not None:
        fields = pipe.components.family.micro_fields
        extra.update(request.micro.settings(fields, (image.height, image.width)))
    prompt, negative, seed = request.prompts[0], request.negative_prompts[0], keys.seeds[point.segment]
    return pipe.describe(prompt, negative, keys.options, seed, image.width, image.height, extra)


@contextmanager
def frame_bar(enabled: bool, frames: int) -> Iterator[Callable[[], None]]:
    """A tqdm bar over a walk's frames (nothing when ``enabled`` is false); yields ``advance()``."""
    if not enabled:
        yield lambda: None
        return
    from tqdm import tqdm

    # every frame is drawn (no rate limit): a frame takes a whole sampling run, and fast walks finished
    # within tqdm's default 0.1 s would otherwise never show their count
    with tqdm(total=frames, desc="walk", unit="frame", leave=False, mininterval=0) as bar:
        yield lambda: bar.update(1)


def frame_changes(frames: Sequence[Image.Image]) -> list[float]:
    """Mean absolute change (8-bit units, over pixels and channels) from each frame to the next: a smooth
    walk changes by similar small amounts; a jump stands out against the median."""
    arrays = [np.asarray(frame.convert("RGB"), dtype=np.float64) for frame in frames]
    return [float(np.abs(b - a).mean()) for a, b in pairwise(arrays)]
