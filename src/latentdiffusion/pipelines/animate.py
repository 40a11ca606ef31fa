"""Text-to-video with AnimateDiff motion modules (Guo et al. 2024, Sec. 4): a text-to-image model's U-Net with
motion modules after its blocks denoises a clip's latents [B, C, F, H, W] through the same samplers and
classifier-free guidance as an image; the frames are decoded one by one.

Each clip's starting noise [C, F, H, W] is drawn from its own seed (``diffusion.noise``), as diffusers'
``AnimateDiffPipeline`` draws it with one CPU generator per clip.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.diffusion.denoiser import Denoiser
from latentdiffusion.diffusion.noise import seeded_generators
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import (
    ContextWindows,
    MotionConfig,
    MotionModules,
    VideoUNet,
    check_first_frame_windows,
    check_frames,
    mixed_noise,
)
from latentdiffusion.pipelines.request import Request
from latentdiffusion.pipelines.sampling import full_sigmas, guide, integrate, start_scale
from latentdiffusion.pipelines.text_to_image import (
    Refiner,
    latent_format,
    require_text_to_image_model,
    tensor_to_images,
    text_to_image_latents,
    validate_size,
)

DECODE_CHUNK = 16  # frames decoded at once: the decoder works on one frame at a time anyway
MAX_FRAMES = 1024
ANIMATED_FAMILIES = ("sd",)  # AnimateDiff v1/v2/v3 were trained on SD 1.5 (diffusers' AnimateDiffPipeline)


@dataclass(frozen=True)
class MotionLoRA:
    """An AnimateDiff motion LoRA file merged into the motion modules with ``strength``."""

    path: str | Path
    strength: float = 1.0


def load_motion(
    source: str | Path | MotionModules, loras: tuple[MotionLoRA, ...] = (), dtype: torch.dtype | None = None
) -> MotionModules:
    """Motion modules from a file or MotionAdapter folder (or as given), with motion LoRAs merged into a
    copy (the modules given are left as they are)."""
    from latentdiffusion.checkpoints.motion_keys import load_motion_modules, merge_motion_lora

    if isinstance(source, MotionModules):
        modules = source
        if loras:
            copy = MotionModules(source.config).to(next(source.parameters()).dtype)
            copy.load_state_dict(source.state_dict())
            modules = copy.eval().requires_grad_(False)
    else:
        modules = load_motion_modules(source, dtype)
    for lora in loras:
        merge_motion_lora(modules, lora.path, lora.strength)
    return modules


# The motion module shipped for the default model: its name, and where it lies under the package's data/.
SHIPPED_MOTION = "default"
SHIPPED_MOTION_FILE = Path("default-motion") / "motion_module.safetensors"
SHIPPED_MOTION_MODEL = "default"  # the model (``Components.name``) it was trained for


def shipped_motion_module() -> Path:
    """The file of the motion module shipped with the default model (trained on the moving-shapes world,
    docs/video.md)."""
    from latentdiffusion.pipelines.loading import shipped_model_dir

    path = shipped_model_dir(str(SHIPPED_MOTION_FILE.parent)) / SHIPPED_MOTION_FILE.name
    if not path.is_file():
        raise UserError("the default motion module is not installed; pass a motion module file or folder")
    return path


def is_shipped_motion_name(source: object) -> bool:
    """True when ``source`` names the shipped motion module ("default") and no such file or folder exists."""
    return isinstance(source, str | Path) and str(source) == SHIPPED_MOTION and not Path(source).exists()


def resolve_motion_module(model_name: str, source: str | Path | MotionModules | None):
    """What ``source`` means for the model called ``model_name``: None is the shipped module when the model
    is the default model (else refused), "default" is the shipped module, anything else stays as it is."""
    if source is None:
        if model_name != SHIPPED_MOTION_MODEL:
            raise UserError(
                f"model {model_name!r} has no shipped motion module: give one (--motion-module FILE, "
                "motion_module=...), an AnimateDiff motion module file or MotionAdapter folder"
            )
        return shipped_motion_module()
    return shipped_motion_module() if is_shipped_motion_name(source) else source


def motion_module_name(source: str | Path | MotionModules | None) -> str:
    """How a clip's settings name its motion module: the file or folder name, "default" for the shipped
    one, "given" for loaded modules."""
    if source is None or is_shipped_motion_name(source):
        return SHIPPED_MOTION
    return Path(source).name if isinstance(source, str | Path) else "given"


WORDS_SUFFIX = ".embeddings"  # motion_module.safetensors -> motion_module.embeddings/WORD.safetensors


def motion_words_dir(source: str | Path | MotionModules | None) -> Path | None:
    """The folder of prompt words learned with the motion module file or folder ``source``
    (``NAME.embeddings/`` beside it, one textual-inversion file per word), where there is one."""
    if not isinstance(source, str | Path):
        return None
    folder = words_folder(Path(source))
    return folder if folder.is_dir() else None


def words_folder(module: Path) -> Path:
    """Where the words learned with the motion module file or folder ``module`` belong."""
    return module.parent / f"{module.name if module.is_dir() else module.stem}{WORDS_SUFFIX}"


def with_motion_words(components: Components, folder: str | Path | None) -> Components:
    """``components`` whose tokenizers also know the words in ``folder`` (a copy: ``components`` keep
    their own tokenizers, so still images never see the words); as they are without a folder."""
    from dataclasses import replace

    from latentdiffusion.embeddings import load_embeddings_dir

    if folder is None:
        return components
    words = replace(components, tokenizers=dict(components.tokenizers))
    load_embeddings_dir(words, folder)
    return words


def check_frame_count(frames: int) -> None:
    if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
        raise UserError(f"frames must be a whole number in [1, {MAX_FRAMES}], got {frames!r}")


@dataclass(frozen=True)
class Still:
    """The still a text-to-video clip starts from, for modules that animate a first frame: the model's
    image, without the module's words (they are for the clip's frames), of ``prompt`` (None: the clip's
    prompt) and the clip's seed, finished by ``refiner`` where one is given (the model's bundled refiner,
    as its stills are)."""

    prompt: str | None = None
    refiner: Refiner | None = None


@torch.inference_mode()
def animate(
    components: Components,
    request: Request,
    motion: MotionModules,
    *,
    frames: int,
    width: int,
    height: int,
    windows: ContextWindows | None = None,
    first_image: Image.Image | None = None,
    still: Still = Still(),
    words: str | Path | None = None,
) -> list[list[Image.Image]]:
    """One clip (a list of ``frames`` images) per (prompt, negative prompt, seed) of ``request``. ``motion``
    is moved to the model's device and dtype; ``words``: a folder of prompt words learned with it, which
    the clip's prompt uses (``with_motion_words``). Modules that animate a first frame
    (``MotionConfig.first_frame``) start each clip from ``first_image`` (RGB, ``width`` x ``height``;
    image-to-video) or, without one, from ``still`` (text-to-video)."""
    options = request.options
    options.validate()
    check_frame_count(frames)
    at_once = frames if windows is None else min(frames, windows.length)  # frames per U-Net call
    validate_size(components, width, height, len(request.seeds) * at_once)
    require_text_to_image_model(components)
    if request.control:
        raise UserError("ControlNet (control) does not work with motion modules yet: leave it out")
    if components.family.name not in ANIMATED_FAMILIES:
        raise UserError(
            f"model {components.name!r} is a {components.family.name} model: motion modules run on Stable "
            "Diffusion 1.x U-Nets (AnimateDiff's SDXL modules are not supported yet)"
        )
    motion.config.check_fits(components.unet.config, "the motion module")
    if first_image is not None and not motion.config.first_frame:
        raise UserError(
            "this motion module does not animate a given first frame: leave the first frame out, or use "
            "a module trained for it (ldm train-motion --first-frame)"
        )
    if windows is None:
        check_frames(frames, motion.config.max_frames)
    else:
        windows.validate(motion.config.max_frames)
    if motion.config.first_frame:  # before the first frame's still is made
        check_first_frame_windows(frames, windows)
    motion = motion.to(components.device, components.dtype)
    network = VideoUNet(components.unet, motion, windows)
    cond, uncond = request.conditioning(with_motion_words(components, words), width, height)
    latents = latent_format(components)
    shape = (len(request.seeds), latents.channels, frames, height // latents.factor, width // latents.factor)
    noise = clip_noise(request, shape, motion.config.noise_correlation, components.device)
    sigmas = full_sigmas(components, options)
    x = noise * start_scale(components, options, sigmas)
    denoiser = Denoiser(
        network,
        components.process,
        components.config.schedule.prediction_type,
        round_timesteps=options.round_timesteps,
        dtype=components.dtype,
    )
    first = None
    if first_image is not None:
        first = image_latents(components, first_image, width, height).expand(len(request.seeds), -1, -1, -1)
    elif motion.config.first_frame:
        first = first_frames(components, request, width, height, still)
    extra = None if first is None else {"first_frame": first}
    clips = integrate(
        guide(denoiser, cond, uncond, options, extra), x, sigmas, options, request.seeds, request.callback
    )
    if first is not None:  # the network saw the given frame 0; the sampler's own frame 0 is not used
        clips = torch.cat([first[:, :, None].to(clips.dtype), clips[:, :, 1:]], dim=2)
    return [decode_frames(components, clip) for clip in clips]


def first_frames(
    components: Components, request: Request, width: int, height: int, still: Still = Still()
) -> torch.Tensor:
    """For modules that animate a given first frame: each clip's first frame is the ``still`` the model
    makes with the clip's negative prompt, seed and options (``text_to_image``), as unit-scale latents
    [B, C, h, w]; a text-to-video clip is that image, animated (Emu Video's factorisation)."""
    from dataclasses import replace

    prompts = request.prompts if still.prompt is None else [still.prompt] * len(request.prompts)
    request = replace(request, prompts=prompts, latents=None, callback=None)
    return text_to_image_latents(components, request, width=width, height=height, refiner=still.refiner)


def still_prompt_for(
    model_name: str, motion: MotionConfig, prompt: str, seed: int, given: str | None, first_image: bool
) -> str | None:
    """The prompt of the still that a text-to-video clip of ``prompt`` starts from, for modules that
    animate a first frame (None for other modules or with a given first image): ``given``; else, on the
    default model and a prompt of the moving-shapes world, the world's start for it and the clip's seed
    (``training.moving_shapes.start_prompt``: the object where its motion has room); else the prompt."""
    if not motion.first_frame or first_image:
        if given is not None:
            raise UserError(
                "a first-frame prompt is for modules that animate a first frame (ldm train-motion "
                "--first-frame), without a given first frame: leave it out"
            )
        return None
    if given is not None:
        return given
    if model_name != SHIPPED_MOTION_MODEL:
        return prompt
    from latentdiffusion.training.moving_shapes import start_prompt

    try:
        return start_prompt(prompt, seed)
    except ValueError:  # not a moving-shapes prompt: the still of the prompt itself
        return prompt


def clip_noise(request: Request, shape: tuple[int, ...], alpha: float, device: torch.device) -> torch.Tensor:
    """Each clip's starting noise [C, F, h, w] from its seed: independent frames, or for modules trained
    with a mixed noise prior (``alpha`` > 0) the same prior, its shared part drawn from the seed after the
    frames' (``models.motion.mixed_noise``). Given ``latents`` are the starting noise as they are."""
    if not alpha or request.latents is not None:
        return request.noise(shape, device)
    generators = seeded_generators(request.seeds)
    frames = request.noise(shape, device, generators)
    shared = request.noise((shape[0], shape[1], 1, *shape[3:]), device, generators)
    return mixed_noise(frames, shared, alpha)


def image_latents(components: Components, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """The unit-scale latent [1, C, h, w] of a clip's given first frame (the posterior mode)."""
    from latentdiffusion.pipelines.images import images_to_tensor

    if image.size != (width, height):
        raise UserError(f"the first frame is {image.width}x{image.height}, the clip {width}x{height}")
    vae = components.autoencoder
    dtype = next(vae.parameters()).dtype
    return vae.to_latent(images_to_tensor([image], components.device, dtype)).float()


def decode_frames(components: Components, clip: torch.Tensor) -> list[Image.Image]:
    """A clip's unit-scale latents [C, F, h, w] -> F RGB images, ``DECODE_CHUNK`` frames at a time."""
    vae = components.autoencoder
    dtype = next(vae.parameters()).dtype
    frames = clip.transpose(0, 1)  # [F, C, h, w]
    images: list[Image.Image] = []
    for chunk in frames.split(DECODE_CHUNK):
        images += tensor_to_images(vae.from_latent(chunk.to(dtype)))
    return images
