"""What the ComfyUI nodes do, each a small function over the library (their declarations, which
/object_info lists, are in ``catalog``).

``run`` is the running prompt (``executor.Run``): the served model, the LoRA patcher, the file folders,
the step callback. A bad value the declarations cannot catch is a ``UserError`` naming what to change.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from latentdiffusion.errors import UserError
from latentdiffusion.serving.comfy.files import check_name, parse_reference
from latentdiffusion.serving.comfy.sampling import Sampling, ksample
from latentdiffusion.serving.comfy.values import (
    Clip,
    Conditioning,
    ControlHint,
    Latent,
    Model,
    Vae,
    image_to_pil,
    image_to_tensor,
    mask_from_alpha,
    pil_to_image,
)

# ---------------------------------------------------------------------------------------- loaders


def load_checkpoint(run: Any, ckpt_name: str) -> tuple:
    """The named model, loaded first if another one is in memory (one model at a time, as the
    AUTOMATIC1111 routes switch it; the old weights are released)."""
    components = run.use_checkpoint(run.server.find_checkpoint(ckpt_name))
    return Model(components), Clip(components), Vae(components)


def load_lora(
    run: Any, model: Model, clip: Clip, lora_name: str, strength_model: float, strength_clip: float
) -> tuple:
    if strength_model == 0 and strength_clip == 0:
        return model, clip
    path = run.server.lora_path(lora_name)
    run.patcher.check(path)  # a file that does not fit the model is refused here, naming this node
    if strength_model != 0:
        model = replace(model, loras=(*model.loras, (path, strength_model)))
    if strength_clip != 0:
        clip = Clip(clip.components, (*clip.loras, (path, strength_clip)))
    return model, clip


def epsilon_scaling(run: Any, model: Model, scaling_factor: float) -> tuple:
    """ComfyUI's Epsilon Scaling node: the model samples with its guided noise estimate divided by the
    factor (``pipelines.sampling.eps_scaled``)."""
    return (replace(model, eps_scaling=scaling_factor),)


def load_controlnet(run: Any, control_net_name: str) -> tuple:
    path = run.server.controlnet_path(control_net_name)
    return ((run.server.state.controlnets.load(path), control_net_name),)


# ------------------------------------------------------------------------------------ conditioning


def set_last_layer(run: Any, clip: Clip, stop_at_clip_layer: int) -> tuple:
    """CLIP skip: -1 uses the last layer, -2 the one before it (the web UI's CLIP skip 2), ..."""
    if stop_at_clip_layer == -1:
        return (clip,)
    from latentdiffusion.pipelines.pipeline import Pipeline
    from latentdiffusion.serving.a1111_models import clip_skip_supported, max_clip_skip, with_clip_skip

    pipe = Pipeline(clip.components)
    if not clip_skip_supported(pipe):
        raise UserError(
            f"model {clip.components.name!r} reads fixed text-encoder layers (SD 2.x, SDXL, SD3): "
            "CLIPSetLastLayer other than -1 works on SD 1.x-style encoders only"
        )
    if -stop_at_clip_layer > max_clip_skip(pipe):
        raise UserError(
            f"stop_at_clip_layer {stop_at_clip_layer}: the text encoder has {max_clip_skip(pipe)} layers"
        )
    return (Clip(with_clip_skip(pipe, -stop_at_clip_layer).components, clip.loras),)


def encode_text(run: Any, text: str, clip: Clip) -> tuple:
    from latentdiffusion.prompts import check_text

    check_text(text)
    return (Conditioning(text, clip),)


def apply_controlnet(
    run: Any,
    positive: Conditioning,
    negative: Conditioning,
    control_net: tuple,
    image: torch.Tensor,
    strength: float,
    start_percent: float,
    end_percent: float,
    vae: Vae | None = None,
) -> tuple:
    if strength == 0 or start_percent >= end_percent:
        return positive, negative
    network, name = control_net
    hint = ControlHint(network, name, image_to_pil(image[:1])[0], strength, start_percent, end_percent)
    return (
        Conditioning(positive.text, positive.clip, (*positive.controls, hint)),
        Conditioning(negative.text, negative.clip, negative.controls),
    )


# ------------------------------------------------------------------------------------------ latents


def empty_latent(run: Any, width: int, height: int, batch_size: int) -> tuple:
    multiple = run.server.state.size_multiple
    width, height = width - width % multiple, height - height % multiple
    if width < multiple or height < multiple:
        raise UserError(f"width and height must be at least {multiple} for this model")
    return (Latent(None, width, height, batch_size),)


def upscale_latent(
    run: Any, samples: Latent, upscale_method: str, width: int, height: int, crop: str
) -> tuple:
    multiple = run.server.state.size_multiple
    width, height = width - width % multiple, height - height % multiple
    if width < multiple or height < multiple:
        raise UserError(f"width and height must be at least {multiple} for this model")
    if samples.samples is None:
        return (Latent(None, width, height, samples.batch, samples.noise_mask),)
    factor = samples.width // samples.samples.shape[-1]
    resized = resize(samples.samples, width // factor, height // factor, upscale_method, crop)
    return (Latent(resized, width, height, resized.shape[0], samples.noise_mask),)


def upscale_latent_by(run: Any, samples: Latent, upscale_method: str, scale_by: float) -> tuple:
    """The latent scaled by ``scale_by`` (its pixel size rounded to the model's multiple)."""
    width, height = round(samples.width * scale_by), round(samples.height * scale_by)
    largest = run.server.state.limits.max_side
    if max(width, height) > largest:
        raise UserError(f"scale_by {scale_by} makes {width}x{height}; the largest side is {largest}")
    return upscale_latent(run, samples, upscale_method, width, height, "disabled")


def resize(x: torch.Tensor, width: int, height: int, method: str, crop: str) -> torch.Tensor:
    """[N, C, H, W] to [N, C, height, width] (ComfyUI's ``common_upscale``: crop "center" first cuts
    the source to the target's aspect ratio)."""
    if crop == "center":
        x = center_crop(x, width / height)
    corners = {"align_corners": False} if method in ("bilinear", "bicubic") else {}
    return F.interpolate(x.float(), size=(height, width), mode=method, **corners)


def center_crop(x: torch.Tensor, aspect: float) -> torch.Tensor:
    """The middle of [..., H, W] with width / height = ``aspect``."""
    old_w, old_h = x.shape[-1], x.shape[-2]
    if old_w / old_h > aspect:
        keep = round(old_h * aspect)
        left = (old_w - keep) // 2
        return x[..., :, left : left + keep]
    keep = round(old_w / aspect)
    top = (old_h - keep) // 2
    return x[..., top : top + keep, :]


def scale_image(
    run: Any, image: torch.Tensor, upscale_method: str, width: int, height: int, crop: str
) -> tuple:
    """IMAGE resized (ComfyUI's ImageScale; 0 for one side keeps the aspect ratio)."""
    old_h, old_w = image.shape[1], image.shape[2]
    if width == 0 and height == 0:
        return (image,)
    width = width or max(1, round(old_w * height / old_h))
    height = height or max(1, round(old_h * width / old_w))
    largest = run.server.state.limits.max_side
    if max(width, height) > largest:
        raise UserError(f"{width}x{height} is over the largest side {largest}")
    pixels = image.permute(0, 3, 1, 2)
    if crop == "center":
        pixels = center_crop(pixels, width / height)
    if upscale_method == "lanczos":
        pictures = image_to_pil(pixels.permute(0, 2, 3, 1))
        return (pil_to_image([p.resize((width, height), Image.Resampling.LANCZOS) for p in pictures]),)
    resized = resize(pixels, width, height, upscale_method, "disabled")
    return (resized.clamp(0, 1).permute(0, 2, 3, 1).contiguous(),)


def set_noise_mask(run: Any, samples: Latent, mask: torch.Tensor) -> tuple:
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    return (Latent(samples.samples, samples.width, samples.height, samples.batch, mask),)


# ---------------------------------------------------------------------------------------- sampling


def ksampler(
    run: Any,
    model: Model,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Conditioning,
    negative: Conditioning,
    latent_image: Latent,
    denoise: float = 1.0,
) -> tuple:
    setting = Sampling(seed, steps, cfg, sampler_name, scheduler, denoise)
    return (_sample(run, model, positive, negative, latent_image, setting),)


def ksampler_advanced(
    run: Any,
    model: Model,
    add_noise: str,
    noise_seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: Conditioning,
    negative: Conditioning,
    latent_image: Latent,
    start_at_step: int,
    end_at_step: int,
    return_with_leftover_noise: str,
) -> tuple:
    setting = Sampling(
        noise_seed,
        steps,
        cfg,
        sampler_name,
        scheduler,
        add_noise=add_noise == "enable",
        start=start_at_step,
        end=end_at_step,
        force_full_denoise=return_with_leftover_noise != "enable",
    )
    return (_sample(run, model, positive, negative, latent_image, setting),)


def _sample(
    run: Any, model: Model, positive: Conditioning, negative: Conditioning, latent: Latent, setting: Sampling
) -> Latent:
    limits = run.server.state.limits
    if latent.batch > limits.max_images:
        raise UserError(f"the latent holds {latent.batch} images; the limit is {limits.max_images}")
    if max(latent.width, latent.height) > limits.max_side:
        raise UserError(
            f"the latent is {latent.width}x{latent.height} pixels; the largest side is {limits.max_side}"
        )
    samples = ksample(
        model,
        positive,
        negative,
        latent,
        setting,
        use_clip=lambda c: run.patcher.use(model.loras, c.clip.loras),
        use_model=lambda m: run.patcher.use(m.loras, positive.clip.loras),
        controlled=run.controlled,
        callback=run.on_step,
    )
    return Latent(samples, latent.width, latent.height, samples.shape[0], latent.noise_mask)


# ------------------------------------------------------------------------------------------ images


@torch.inference_mode()
def vae_decode(run: Any, samples: Latent, vae: Vae) -> tuple:
    from latentdiffusion.pipelines.text_to_image import decode_images
    from latentdiffusion.pipelines.vae_tiling import with_tiled_autoencoder

    components = vae.components
    latents = samples.resolve(components).to(components.device)
    return (pil_to_image(decode_images(with_tiled_autoencoder(components), latents)),)


@torch.inference_mode()
def vae_encode(run: Any, pixels: torch.Tensor, vae: Vae) -> tuple:
    pixels, _ = _crop_to_multiple(run, pixels)
    return (_encode(vae, pixels),)


@torch.inference_mode()
def vae_encode_for_inpaint(
    run: Any, pixels: torch.Tensor, vae: Vae, mask: torch.Tensor, grow_mask_by: int
) -> tuple:
    """ComfyUI's VAEEncodeForInpaint: the masked pixels set to grey before encoding, the mask grown by
    ``grow_mask_by`` pixels as the latent's noise mask (for inpainting models; full denoise)."""
    mask = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    mask = F.interpolate(mask, size=pixels.shape[1:3], mode="bilinear", align_corners=False)
    pixels, mask = _crop_to_multiple(run, pixels, mask)
    grown = mask.round()
    if grow_mask_by > 0:
        kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
        grown = F.conv2d(grown, kernel, padding=math.ceil((grow_mask_by - 1) / 2)).clamp(0, 1)
        grown = grown[..., : mask.shape[-2], : mask.shape[-1]]
    keep = (1 - mask.round())[:, 0, :, :, None]
    pixels = (pixels[..., :3] - 0.5) * keep + 0.5
    latent = _encode(vae, pixels)
    return (Latent(latent.samples, latent.width, latent.height, latent.batch, grown.round()),)


def _crop_to_multiple(run: Any, pixels: torch.Tensor, mask: torch.Tensor | None = None) -> tuple:
    """Centre-crop IMAGE (and its mask) to sides that are multiples of the model's size multiple."""
    multiple = run.server.state.size_multiple
    height, width = pixels.shape[1], pixels.shape[2]
    new_h, new_w = height - height % multiple, width - width % multiple
    if new_h < multiple or new_w < multiple:
        raise UserError(f"the image is {width}x{height}; both sides must be at least {multiple}")
    if max(new_w, new_h) > run.server.state.limits.max_side:
        largest = run.server.state.limits.max_side
        raise UserError(f"the image is {width}x{height}; the largest side this server works at is {largest}")
    top, left = (height - new_h) // 2, (width - new_w) // 2
    pixels = pixels[:, top : top + new_h, left : left + new_w]
    if mask is not None:
        mask = mask[..., top : top + new_h, left : left + new_w]
    return pixels, mask


def _encode(vae: Vae, pixels: torch.Tensor) -> Latent:
    """The posterior mean of each image (deterministic), in the model's latent space."""
    from latentdiffusion.pipelines.vae_tiling import with_tiled_autoencoder

    components = with_tiled_autoencoder(vae.components)
    autoencoder = components.autoencoder
    dtype = next(vae.components.autoencoder.parameters()).dtype
    images = image_to_tensor(pixels, components.device).to(dtype)
    samples = torch.cat([autoencoder.to_latent(images[i : i + 1]) for i in range(len(images))]).float()
    factor = pixels.shape[2] // samples.shape[-1]
    return Latent(samples, samples.shape[-1] * factor, samples.shape[-2] * factor, samples.shape[0])


def load_image(run: Any, image: str) -> tuple:
    data = run.server.files.get(parse_reference(image))
    if data is None:
        raise UserError(f"Invalid image file: {image}")
    picture = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return pil_to_image([picture.convert("RGB")]), mask_from_alpha(picture)


def load_image_mask(run: Any, image: str, channel: str) -> tuple:
    """A MASK from one channel of an uploaded image (alpha inverted, as ComfyUI's LoadImageMask)."""
    data = run.server.files.get(parse_reference(image))
    if data is None:
        raise UserError(f"Invalid image file: {image}")
    picture = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGBA")
    if channel == "alpha":
        return (mask_from_alpha(picture),)
    band = picture.getchannel(channel[0].upper())
    return (pil_to_image([band.convert("RGB")])[..., 0],)


def save_image(run: Any, images: torch.Tensor, filename_prefix: str = "ComfyUI") -> dict:
    return _save(run, images, "output", filename_prefix)


def preview_image(run: Any, images: torch.Tensor) -> dict:
    return _save(run, images, "temp", f"ComfyUI_temp_{run.prompt_id[:5]}")


def _save(run: Any, images: torch.Tensor, folder: str, prefix: str) -> dict:
    subfolder, _, name = prefix.rpartition("/")
    check_name(subfolder, "subfolder")
    check_name(name or "ComfyUI", "filename_prefix")
    text = {"prompt": json.dumps(run.prompt)}
    for key, value in (run.extra_data.get("extra_pnginfo") or {}).items():
        text[str(key)] = json.dumps(value)
    results = []
    for picture in image_to_pil(images):
        filename = run.server.files.save_png(folder, subfolder, name or "ComfyUI", picture, text)
        results.append({"filename": filename, "subfolder": subfolder, "type": folder})
    return {"images": results}
