"""``Pipeline``: the public face of a loaded model (``ld.load(...)`` returns one)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Unpack

import torch
from PIL import Image

from latentdiffusion.components import Components
from latentdiffusion.diffusion.noise import variation_noise
from latentdiffusion.diffusion.schedules import SPACINGS
from latentdiffusion.embeddings import Embedding, embedding_settings
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.images import ImageInput, load_image, load_mask
from latentdiffusion.pipelines.metadata import format_parameters, sampler_display_name, skip_layer_settings
from latentdiffusion.pipelines.request import (
    CommonOptions,
    Request,
    common_options,
    make_request,
    progress_bar,
)
from latentdiffusion.pipelines.sampling import SamplingOptions, discretisation
from latentdiffusion.pipelines.token_merging import merging_parameters, with_token_merging
from latentdiffusion.pipelines.vae_tiling import with_tiled_autoencoder

DEFAULT_REFINER_SWITCH = 0.8  # a refiner given to ``generate`` takes the last 20% of the schedule


class Pipeline:
    """A model in memory and the operations on it; the networks stay plain torch modules."""

    def __init__(self, components: Components) -> None:
        self.components = components
        self.backend = None  # where the U-Net runs: None (torch) or a ``backends`` runtime with ``wrap``
        # A refiner bundled with the model (a low-noise expert of the same architecture, loaded from the
        # model folder's refiner/): ``generate`` hands it the latent at ``refiner_switch`` unless told
        # otherwise; LoRAs and embeddings loaded into this pipeline reach it too.
        self.refiner: Pipeline | None = None
        self.refiner_switch: float = DEFAULT_REFINER_SWITCH

    def served(self, components: Components | None = None) -> Components:
        """``components`` (default: this pipeline's) as requests run them: with the U-Net on the backend."""
        components = components or self.components
        return components if self.backend is None else self.backend.wrap(components)

    @property
    def unet(self) -> torch.nn.Module:
        return self.components.unet

    @property
    def vae(self) -> torch.nn.Module:
        return self.components.autoencoder

    @property
    def text_encoder(self) -> torch.nn.Module | None:
        """The first text encoder (every network by role: ``pipe.components.modules``)."""
        return self.components.text_encoder

    @property
    def tokenizer(self):
        return self.components.tokenizer

    @property
    def family(self):
        return self.components.family

    @property
    def config(self):
        return self.components.config

    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        *,
        cache_interval: int | None = None,
        token_merging: float | None = None,
        variation_seed: int | None = None,
        variation_strength: float = 0.0,
        refiner: Pipeline | None = None,
        refiner_switch: float | None = None,
        **options: Unpack[CommonOptions],
    ) -> list[Image.Image]:
        """Text-to-image at ``width`` x ``height`` (default: the model's size). The options every method
        takes (steps, guidance_scale, sampler, sigmas, seed, num_images, latents, eta, guidance_rescale,
        round_timesteps, conditioning, callback, progress, preview) are ``request.CommonOptions``; unset
        ``steps``, ``sampler`` and ``guidance_scale`` are the model's defaults, here and in every method.

        ``refiner`` (another pipeline, e.g. the SDXL refiner) finishes each image: this model runs the
        steps before ``refiner_switch`` (0..1, default 0.8) of the schedule, the refiner the rest on the
        same latent with the same settings (diffusers' ``denoising_end`` / ``denoising_start``). Without
        one, the model's bundled refiner (``self.refiner``, at ``self.refiner_switch`` unless
        ``refiner_switch`` says otherwise) finishes the image, except under ControlNet; ``refiner_switch=1``
        runs this model alone.

        ``variation_seed`` with ``variation_strength`` in (0, 1] moves every image's starting noise that
        far towards the variation seed's noise (``diffusion.noise.variation_noise``), for variations of
        an image that keep its composition at small strengths.

        Each image's ``info["parameters"]`` holds its settings in the PNG-info text format.
        ``cache_interval`` N > 1 recomputes the U-Net's deep features only every N steps (DeepCache,
        see ``pipelines.deepcache``: about N/(1 + 0.1 (N - 1)) times faster sampling, slightly different
        images). ``token_merging`` r in (0, 0.75] runs the finest attention level's self-attention over
        r fewer of its tokens (ToMe, see ``models.token_merging``: faster at 512 px and up, slightly
        different images). Images larger than 512x512 are decoded in blended tiles.
        """
        from latentdiffusion.pipelines.deepcache import with_deep_cache
        from latentdiffusion.pipelines.text_to_image import latent_shape, refiner_pass, text_to_image

        width = width or self.config.sample_size
        height = height or self.config.sample_size
        if options.get("control") and cache_interval and cache_interval > 1:
            raise UserError("DeepCache (cache_interval > 1) and ControlNet (control) cannot be combined yet")
        network = with_token_merging(with_deep_cache(self.served(), cache_interval), token_merging)
        components = with_tiled_autoencoder(network)
        extra: dict[str, Any] = {"DeepCache": cache_interval} if cache_interval and cache_interval > 1 else {}
        extra.update(merging_parameters(token_merging))
        variation = _variation(variation_seed, variation_strength, options.get("latents"))
        extra.update(variation)
        second, refined = refiner_pass(self, refiner, refiner_switch, bool(options.get("control")))
        extra.update(refined)

        def work(request: Request) -> Images:
            if variation:
                shape = latent_shape(self.components, len(request.seeds), width, height)
                noise = variation_noise(shape, request.seeds, variation_seed, variation_strength)
                request = replace(request, latents=noise)
            return text_to_image(components, request, width=width, height=height, refiner=second)

        return self._run("generate", work, prompt, negative_prompt, options, extra)

    def img2img(
        self,
        image: ImageInput,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        strength: float = 0.75,
        *,
        token_merging: float | None = None,
        refiner_switch: float | None = None,
        **options: Unpack[CommonOptions],
    ) -> list[Image.Image]:
        """Image-to-image (SDEdit): noise ``image`` to the level ``strength`` selects (0 keeps it, 1
        replaces it; ``int(steps * strength)`` steps run, as diffusers counts them for SD 1.x/2.x/XL; SD3:
        all but ``int(steps - steps * strength)``, see ``image_to_image.strength_steps``) and denoise it
        towards the prompt. On an SDXL
        refiner this is the refiner pass over a finished image. Options and seeds as in ``generate``;
        ``latents`` is the noise added to the encoded image. The output has the input's size, sides
        rounded down to multiples of the model's size multiple (8; 16 for SD3). ``token_merging`` as in
        ``generate``. A bundled refiner (``self.refiner``) runs the steps below its switch
        (``refiner_switch``, default the model's own; 1: this model alone), as in ``generate``."""
        from latentdiffusion.pipelines.image_to_image import image_to_image
        from latentdiffusion.pipelines.inpaint import MaskOptions, inpaint, is_inpainting_model
        from latentdiffusion.pipelines.text_to_image import refiner_pass

        picture = self._input_image(image)
        components = self._edited(token_merging)
        inpainting, control = is_inpainting_model(self.components), bool(options.get("control"))
        refiner, refined = (None, {}) if inpainting else refiner_pass(self, None, refiner_switch, control)

        def work(request: Request) -> Images:
            if inpainting:  # an inpainting model redraws under an all-white mask
                everything = Image.new("L", picture.size, 255)
                unmasked = MaskOptions(blur=0, paste_back=False)
                return inpaint(
                    components, picture, everything, request, strength=strength, mask_options=unmasked
                )
            return image_to_image(components, picture, request, strength=strength, refiner=refiner)

        extra = {"Denoising strength": strength, **merging_parameters(token_merging), **refined}
        return self._run("img2img", work, prompt, negative_prompt, options, extra)

    def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        strength: float = 1.0,
        *,
        mask_blur: float = 4.0,
        invert_mask: bool = False,
        only_masked: bool = False,
        padding: int = 32,
        masked_content: str = "original",
        paste_back: bool = True,
        token_merging: float | None = None,
        **options: Unpack[CommonOptions],
    ) -> list[Image.Image]:
        """Repaint the white part of ``mask`` (see docs/editing.md). Works with 9-channel inpainting
        models and, by re-noising and blending the known region each step, with any 4-channel model.
        Options as in ``generate``; ``latents`` is the starting noise (strength 1) or the noise added to
        the encoded image.

        ``mask_blur`` feathers the paste-back (std in pixels); ``paste_back`` returns the exact input
        pixels outside the feathered mask; ``only_masked`` works on a crop around the mask (plus
        ``padding``) at the model's resolution; ``masked_content`` ("original", "noise", "nothing") is
        what the masked area starts from when ``strength`` < 1. ``token_merging`` as in ``generate``.
        """
        from latentdiffusion.pipelines.inpaint import MaskOptions
        from latentdiffusion.pipelines.inpaint import inpaint as inpaint_images

        picture, mask_image = load_image(image), load_mask(mask)
        mask_options = MaskOptions(mask_blur, invert_mask, only_masked, padding, masked_content, paste_back)
        components = self._edited(token_merging)

        def work(request: Request) -> Images:
            return inpaint_images(
                components, picture, mask_image, request, strength=strength, mask_options=mask_options
            )

        extra = {**_mask_settings(strength, mask_options), **merging_parameters(token_merging)}
        return self._run("inpaint", work, prompt, negative_prompt, options, extra)

    def outpaint(
        self,
        image: ImageInput,
        prompt: str | Sequence[str],
        left: int = 0,
        right: int = 0,
        top: int = 0,
        bottom: int = 0,
        negative_prompt: str | Sequence[str] | None = None,
        strength: float = 1.0,
        *,
        mask_blur: float = 4.0,
        masked_content: str = "original",
        paste_back: bool = True,
        token_merging: float | None = None,
        **options: Unpack[CommonOptions],
    ) -> list[Image.Image]:
        """Extend the canvas by ``left``/``right``/``top``/``bottom`` pixels (multiples of 8) and
        inpaint the new area; the new area starts as the image's edge pixels stretched outwards.
        Options as in ``inpaint``; ``latents`` has the extended canvas's size."""
        from latentdiffusion.pipelines.inpaint import MaskOptions
        from latentdiffusion.pipelines.outpaint import outpaint as outpaint_images

        picture = load_image(image)
        mask_options = MaskOptions(blur=mask_blur, masked_content=masked_content, paste_back=paste_back)
        sides = {"left": left, "right": right, "top": top, "bottom": bottom}
        components = self._edited(token_merging)

        def work(request: Request) -> Images:
            return outpaint_images(
                components, picture, request, **sides, strength=strength, mask_options=mask_options
            )

        extra = {
            **_mask_settings(strength, mask_options),
            "Outpaint": " ".join(f"{k}={v}" for k, v in sides.items()),
            **merging_parameters(token_merging),
        }
        return self._run("outpaint", work, prompt, negative_prompt, options, extra)

    def upscale(
        self,
        image: ImageInput,
        prompt: str | Sequence[str] = "",
        negative_prompt: str | Sequence[str] | None = None,
        noise_level: int = 20,
        *,
        tile_size: int | None = 128,
        tile_overlap: int = 32,
        upscaler: Pipeline | None = None,
        **options: Unpack[CommonOptions],
    ) -> list[Image.Image]:
        """Super-resolution by the upscaler model (this pipeline, or ``upscaler``): output 4x the input
        (x the autoencoder's factor). ``noise_level`` (0-350) is the augmentation noise added to the
        input, which the model then removes; inputs larger than ``tile_size`` pixels run in tiles that
        overlap by ``tile_overlap`` (None: no tiles). Unset sampling settings are the upscaler
        model's defaults (guidance 9 for Stability AI's x4 upscaler, as its reference pipeline); other
        options as in ``generate``, ``latents`` at the output's latent size."""
        from latentdiffusion.pipelines.upscale import upscale as upscale_image

        model = (upscaler or self).components
        picture = load_image(image)

        def work(request: Request) -> Images:
            return upscale_image(
                (upscaler or self).served(model),
                picture,
                request,
                noise_level=noise_level,
                tile_size=tile_size,
                tile_overlap=tile_overlap,
            )

        extra = {"Noise level": noise_level, "Upscaler": model.name}
        return self._run("upscale", work, prompt, negative_prompt, options, extra, model)

    def _input_image(self, source: ImageInput, what: str = "image") -> Image.Image:
        """An input picture (path or PIL) as RGB, its sides rounded down to the model's size multiple."""
        from latentdiffusion.pipelines.images import round_down
        from latentdiffusion.pipelines.text_to_image import size_multiple

        return round_down(load_image(source, what), size_multiple(self.components), what)

    def _edited(self, token_merging: float | None) -> Components:
        """The components an editing request runs: served, with token merging at ``token_merging`` (None:
        off), encoding and decoding large images in tiles."""
        return with_tiled_autoencoder(with_token_merging(self.served(), token_merging))

    def _run(
        self,
        method: str,
        work: Callable[[Request], Images],
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None,
        given: Mapping[str, Any],
        extra: dict[str, Any],
        model: Components | None = None,
    ) -> Images:
        """The one request path: expand prompts x num_images with consecutive seeds, fill in the model's
        defaults (``model``, else this pipeline's), report progress, run ``work`` and record each image's
        settings in its ``info["parameters"]``."""
        from latentdiffusion.pipelines.preview import with_preview

        model = model or self.components
        options = common_options(method, given)
        callback = with_preview(model, options["callback"], options["preview"])
        request = make_request(model, prompt, negative_prompt, options, callback)
        with progress_bar(options["progress"], request.options.steps, request.callback) as on_step:
            images = work(replace(request, callback=on_step))
        if request.control:
            from latentdiffusion.pipelines.control import control_parameters

            extra = {**extra, **control_parameters(request.control)}
        if request.micro is not None and images:
            made = (images[0].height, images[0].width)
            extra = {**extra, **request.micro.settings(model.family.micro_fields, made)}
        for image, p, n, s in zip(
            images, request.prompts, request.negative_prompts, request.seeds, strict=True
        ):
            image.info["parameters"] = self.describe(
                p, n, request.options, s, image.width, image.height, extra
            )
        return images

    def describe(
        self,
        prompt: str,
        negative: str,
        options: SamplingOptions,
        seed: int,
        width: int,
        height: int,
        extra: dict[str, Any] | None = None,
    ) -> str:
        """The PNG-info ``parameters`` text for one image; ``extra`` settings follow the common ones."""
        settings = {
            "Steps": options.steps,
            "Sampler": sampler_display_name(options.sampler, discretisation(self.components, options)),
            "CFG scale": options.guidance_scale,
            "Seed": seed,
            "Size": f"{width}x{height}",
            "Model": self.components.name,
        }
        if options.eta is not None:
            settings["Eta"] = options.eta
        if options.guidance_rescale:
            settings["CFG rescale"] = options.guidance_rescale
        if options.guidance_min_sigma and options.guidance_scale != 1:
            settings["CFG min sigma"] = options.guidance_min_sigma
        if options.sigmas in SPACINGS:
            settings["Timestep spacing"] = options.sigmas
        if not options.round_timesteps:
            settings["Timesteps"] = "fractional"
        if options.restart_steps:
            settings["Restart"] = f"{options.restart_steps}x{options.restart_times}"
        if options.eps_scaling != 1:
            settings["Eps scaling"] = options.eps_scaling
        settings.update(skip_layer_settings(options.skip_layer_guidance))
        settings.update(extra or {})
        settings.update(embedding_settings(self.components, [prompt, negative]))
        return format_parameters(prompt, negative, settings)

    def walk(
        self,
        prompts: str | Sequence[str],
        seeds: int | Sequence[int] = 0,
        frames: int = 8,
        negative_prompt: str | Sequence[str] | None = None,
        width: int | None = None,
        height: int | None = None,
        *,
        on_frame: Callable[[int, Image.Image], None] | None = None,
        **options: Unpack[CommonOptions],
    ) -> list[Image.Image]:
        """A latent walk through keyframes (one prompt and seed each; one prompt or one seed serves them
        all): ``frames`` frames per segment, the text conditioning interpolated linearly and the starting
        noise spherically (see ``pipelines.walk``); (keyframes - 1) * frames + 1 frames in all, the
        keyframes' frames exactly ``generate(prompt, seed=seed)``. Options as ``generate``'s (no seed,
        num_images or latents); ``progress`` is a bar over frames; ``on_frame(i, frame)`` as each
        frame is done. Each frame's ``info["parameters"]`` records its place in the walk.
        ``pipelines.video_io.write_video(frames, "walk.mp4", fps)`` writes them as a video."""
        from latentdiffusion.pipelines.walk import walk

        return walk(self, prompts, seeds, frames, negative_prompt, width, height, options, on_frame)

    def animate(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        *,
        motion_module: str | Path | Any = None,
        frames: int = 16,
        context: int | None = None,
        overlap: int = 4,
        window_weighting: str = "pyramid",
        motion_loras: Sequence[tuple[str | Path, float]] = (),
        motion_words: str | Path | None = None,
        first_frame: ImageInput | None = None,
        first_frame_prompt: str | None = None,
        **options: Unpack[CommonOptions],
    ) -> list[Image.Image]:
        """A clip of ``frames`` frames with AnimateDiff motion modules (Guo et al. 2024): ``motion_module``
        an original-layout file (v1/v2/v3, .ckpt or .safetensors), a diffusers MotionAdapter folder or
        loaded ``models.motion.MotionModules``; "default" or, on the default model, None: the motion
        module shipped for the default model (``pipelines.animate.shipped_motion_module``); ``motion_loras``
        (path, strength) pairs of AnimateDiff motion LoRA files merged into them. ``context`` N denoises
        clips longer than N frames in sliding windows of N frames, ``overlap`` shared, blended by
        ``window_weighting`` ("pyramid" or "uniform", see ``models.motion.ContextWindows``); without it
        more frames than the module sees at once (24 for v1, 32 for v2/v3) are refused. ``motion_words``: a
        folder of textual-inversion files (prompt words learned with the module) that the prompt uses
        for this clip only; default: the module file's ``NAME.embeddings/`` folder where it has one
        (``pipelines.animate.motion_words_dir``). ``first_frame``: an image (path or PIL) the clip
        starts from, for modules trained to animate one (``ldm train-motion --first-frame``; the size
        defaults to the image's); such modules start from the still of the seed and ``first_frame_prompt``
        without one (default: the prompt; on the default model, the moving-shapes world's start for it,
        ``pipelines.animate.still_prompt_for``). Options as ``generate``'s (``latents``: [1, C, F, H/f,
        W/f]; one clip per call). See ``pipelines.animate``."""
        from latentdiffusion.models.motion import ContextWindows
        from latentdiffusion.pipelines.animate import (
            MotionLoRA,
            Still,
            animate,
            load_motion,
            motion_module_name,
            motion_words_dir,
            resolve_motion_module,
            still_prompt_for,
        )
        from latentdiffusion.pipelines.text_to_image import refiner_pass

        if options.get("num_images", 1) != 1 or not isinstance(prompt, str):
            raise UserError("animate makes one clip per call: give one prompt and leave num_images at 1")
        first_image = None if first_frame is None else self._input_image(first_frame, "first frame")
        width = width or (first_image.width if first_image else self.config.sample_size)
        height = height or (first_image.height if first_image else self.config.sample_size)
        loras = tuple(MotionLoRA(path, strength) for path, strength in motion_loras)
        source = resolve_motion_module(self.components.name, motion_module)
        motion = load_motion(source, loras)
        windows = None if context is None else ContextWindows(context, overlap, window_weighting)
        options = common_options("animate", options)
        request = make_request(self.components, prompt, negative_prompt, options, options["callback"])
        still_prompt = still_prompt_for(
            self.components.name,
            motion.config,
            prompt,
            request.seeds[0],
            first_frame_prompt,
            first_image is not None,
        )
        still_refiner, refiner_settings = (
            (None, {}) if still_prompt is None else refiner_pass(self, None, None, False)
        )
        with progress_bar(options["progress"], request.options.steps, request.callback) as on_step:
            clip = animate(
                self.served(),
                replace(request, callback=on_step),
                motion,
                frames=frames,
                width=width,
                height=height,
                windows=windows,
                first_image=first_image,
                still=Still(still_prompt, still_refiner),
                words=motion_words or motion_words_dir(source),
            )[0]
        extra: dict[str, Any] = {"Motion module": motion_module_name(motion_module), "Frames": frames}
        if still_prompt is not None and still_prompt != prompt:
            extra["First frame prompt"] = still_prompt
        extra.update(refiner_settings)  # the refiner that finished the still
        if first_image is not None:
            extra["First frame"] = Path(first_frame).name if isinstance(first_frame, str | Path) else "image"
        if windows is not None:
            extra.update({"Context": context, "Overlap": overlap, "Window weighting": window_weighting})
        negative, seed = request.negative_prompts[0], request.seeds[0]
        text = self.describe(prompt, negative, request.options, seed, width, height, extra)
        for frame in clip:
            frame.info["parameters"] = text
        return clip

    def load_lora(self, path: str | Path, strength: float = 1.0) -> int:
        """Merge a LoRA file (kohya / A1111 or diffusers/PEFT format) into the denoising network and the
        text encoders with ``strength`` (W += strength * alpha / r * B A, Hu et al. 2022); generation then
        costs what it did before. The family says how the file names its layers (U-Net; SD3's MMDiT;
        SDXL's and SD3's two CLIP encoders); a LoRA for another family's network is refused. Loading the
        same file with ``-strength`` takes it out again (not a DoRA file). Returns the number of layers
        changed. LyCORIS files (LoCon, LoHa, LoKr, full differences, DoRA) merge alike on the U-Net
        families (``models.lycoris``). See ``checkpoints.network_lora``."""
        from latentdiffusion.checkpoints.network_lora import load_model_lora

        if self.refiner is not None:
            self.refiner.load_lora(path, strength)
        return load_model_lora(path, self.family, self.components.modules, strength)

    def load_embedding(self, path: str | Path, token: str | None = None) -> Embedding:
        """Teach the prompts a textual-inversion word (AUTOMATIC1111 .pt/.safetensors, diffusers
        learned_embeds, SDXL clip_l/clip_g): ``token`` (default: the file's stem) then stands for the
        embedding's vectors in prompts and negative prompts. See ``latentdiffusion.embeddings``."""
        from latentdiffusion.embeddings import load_embedding

        if self.refiner is not None:
            self.refiner.load_embedding(path, token)
        return load_embedding(self.components, path, token)

    def load_embeddings(self, folder: str | Path) -> list[Embedding]:
        """Every embedding file in ``folder``, each word named by its file (as the web UI's folder)."""
        from latentdiffusion.embeddings import load_embeddings_dir

        if self.refiner is not None:
            self.refiner.load_embeddings(folder)
        return load_embeddings_dir(self.components, folder)

    def save(self, path: str | Path, format: str = "native") -> None:
        """Write the model: ``native`` (safetensors + JSON config, with the bundled refiner), ``diffusers``
        or ``single-file`` (the model alone: those layouts have no place for a refiner)."""
        from latentdiffusion.checkpoints.formats import save_components

        refiner = None if self.refiner is None else (self.refiner.components, self.refiner_switch)
        save_components(self.components, Path(path), format, refiner=refiner)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        for module in self.components.modules.values():
            module.to(device=device, dtype=dtype)
        if self.refiner is not None:
            self.refiner.to(device=device, dtype=dtype)
        return self


Images = list[Image.Image]


def _variation(seed: int | None, strength: float, latents: torch.Tensor | None) -> dict[str, Any]:
    """The PNG-info settings of a variation request (empty when there is none); refuses bad values."""
    if seed is None or strength == 0:
        return {}
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"variation_seed must be a whole number, got {seed!r}")
    if not isinstance(strength, int | float) or not 0 <= strength <= 1:
        raise UserError(f"variation_strength must be a number in [0, 1], got {strength!r}")
    if latents is not None:
        raise UserError("give either latents or a variation seed, not both")
    return {"Variation seed": seed, "Variation seed strength": strength}


def _mask_settings(strength: float, mask: Any) -> dict[str, Any]:
    """The web UI's PNG-info keys for an inpainting run (plus ours for options it lacks)."""
    blur = int(mask.blur) if float(mask.blur).is_integer() else mask.blur
    settings: dict[str, Any] = {"Denoising strength": strength, "Mask blur": blur}
    if mask.invert:
        settings["Mask mode"] = "Inpaint not masked"
    if mask.only_masked:
        settings["Inpaint area"] = "Only masked"
        settings["Masked area padding"] = mask.padding
    settings["Masked content"] = mask.masked_content
    if not mask.paste_back:
        settings["Paste back"] = False
    return settings
