"""The ComfyUI node types this server runs, declared as ComfyUI's ``nodes.py`` declares them (inputs
with their types, defaults and bounds; outputs; output nodes), which /object_info lists and validation
checks, each with its function in ``nodes``.

The server's limits (image side, steps, batch size, prompt length) are the inputs' ``max`` values, so a
workflow over them is refused before it queues; choice lists (models, LoRAs, ControlNets, uploaded
images, samplers, schedulers) are read from the server when asked.
"""

from __future__ import annotations

from typing import Any

from latentdiffusion.config import EPS_SCALING_RANGE
from latentdiffusion.serving.comfy import names
from latentdiffusion.serving.comfy.files import parse_reference
from latentdiffusion.serving.comfy.graph import Input, NodeType
from latentdiffusion.serving.comfy.nodes import (
    apply_controlnet,
    empty_latent,
    encode_text,
    epsilon_scaling,
    ksampler,
    ksampler_advanced,
    load_checkpoint,
    load_controlnet,
    load_image,
    load_image_mask,
    load_lora,
    preview_image,
    save_image,
    scale_image,
    set_last_layer,
    set_noise_mask,
    upscale_latent,
    upscale_latent_by,
    vae_decode,
    vae_encode,
    vae_encode_for_inpaint,
)

MAX_SEED = 0xFFFFFFFFFFFFFFFF
UPSCALE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")  # ComfyUI's "bislerp" is not offered
CROP_METHODS = ("disabled", "center")


def _max_side(server: Any) -> int:
    return server.state.limits.max_side


def _max_steps(server: Any) -> int:
    return server.state.limits.max_steps


def _max_images(server: Any) -> int:
    return server.state.limits.max_images


def _samplers(server: Any) -> list[str]:
    return list(names.SAMPLERS)


def _schedulers(server: Any) -> list[str]:
    return list(names.SCHEDULERS)


def _check_text(server: Any, constants: dict[str, Any]) -> list[tuple[str, str]]:
    text, limit = constants.get("text"), server.state.limits.max_prompt_chars
    if isinstance(text, str) and len(text) > limit:
        return [("text", f"the prompt is {len(text)} characters long; the limit is {limit}")]
    return []


def _check_image(server: Any, constants: dict[str, Any]) -> list[tuple[str, str]]:
    value = constants.get("image")
    if isinstance(value, str) and server.files.get(parse_reference(value)) is None:
        return [("image", f"Invalid image file: {value}")]
    return []


MODEL, CLIP, VAE = Input("MODEL"), Input("CLIP"), Input("VAE")
CONDITIONING, LATENT, IMAGE, MASK = Input("CONDITIONING"), Input("LATENT"), Input("IMAGE"), Input("MASK")


def _side(default: int, minimum: int = 16) -> Input:
    return Input("INT", {"default": default, "min": minimum, "max": _max_side, "step": 8})


def _sampler_inputs(seed_name: str) -> dict[str, Input]:
    return {
        seed_name: Input("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
        "steps": Input("INT", {"default": 20, "min": 1, "max": _max_steps}),
        "cfg": Input("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        "sampler_name": Input(_samplers),
        "scheduler": Input(_schedulers),
        "positive": CONDITIONING,
        "negative": CONDITIONING,
        "latent_image": LATENT,
    }


NODES: dict[str, NodeType] = {
    node.name: node
    for node in (
        NodeType(
            "CheckpointLoaderSimple",
            "Load Checkpoint",
            "loaders",
            load_checkpoint,
            {"ckpt_name": Input(lambda server: server.checkpoints())},
            outputs=("MODEL", "CLIP", "VAE"),
            description="A model of ldm serve --model-dir (or the one served), loaded if need be.",
        ),
        NodeType(
            "LoraLoader",
            "Load LoRA",
            "loaders",
            load_lora,
            {
                "model": MODEL,
                "clip": CLIP,
                "lora_name": Input(lambda server: server.loras()),
                "strength_model": Input("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
                "strength_clip": Input("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}),
            },
            outputs=("MODEL", "CLIP"),
        ),
        NodeType(
            "Epsilon Scaling",
            "Epsilon Scaling",
            "model_patches/unet",
            epsilon_scaling,
            {
                "model": MODEL,
                "scaling_factor": Input(
                    "FLOAT",
                    {
                        "default": 1.005,
                        "min": EPS_SCALING_RANGE[0],
                        "max": EPS_SCALING_RANGE[1],
                        "step": 0.001,
                    },
                ),
            },
            outputs=("MODEL",),
            description="Divides the guided noise estimate by the factor at every step (Ning et al. 2024).",
        ),
        NodeType(
            "CLIPSetLastLayer",
            "CLIP Set Last Layer",
            "conditioning",
            set_last_layer,
            {
                "clip": CLIP,
                "stop_at_clip_layer": Input("INT", {"default": -1, "min": -24, "max": -1, "step": 1}),
            },
            outputs=("CLIP",),
        ),
        NodeType(
            "CLIPTextEncode",
            "CLIP Text Encode (Prompt)",
            "conditioning",
            encode_text,
            {"text": Input("STRING", {"multiline": True, "dynamicPrompts": True}), "clip": CLIP},
            outputs=("CONDITIONING",),
            check=_check_text,
        ),
        NodeType(
            "EmptyLatentImage",
            "Empty Latent Image",
            "latent",
            empty_latent,
            {
                "width": _side(512),
                "height": _side(512),
                "batch_size": Input("INT", {"default": 1, "min": 1, "max": _max_images}),
            },
            outputs=("LATENT",),
        ),
        NodeType(
            "EmptySD3LatentImage",
            "EmptySD3LatentImage",
            "latent/sd3",
            empty_latent,
            {
                "width": _side(1024),
                "height": _side(1024),
                "batch_size": Input("INT", {"default": 1, "min": 1, "max": _max_images}),
            },
            outputs=("LATENT",),
            description="As EmptyLatentImage: the latent takes the channels of the model that samples it.",
        ),
        NodeType(
            "KSampler",
            "KSampler",
            "sampling",
            ksampler,
            {
                "model": MODEL,
                **_sampler_inputs("seed"),
                "denoise": Input("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
            outputs=("LATENT",),
        ),
        NodeType(
            "KSamplerAdvanced",
            "KSampler (Advanced)",
            "sampling",
            ksampler_advanced,
            {
                "model": MODEL,
                "add_noise": Input(lambda server: ["enable", "disable"]),
                **_sampler_inputs("noise_seed"),
                "start_at_step": Input("INT", {"default": 0, "min": 0, "max": 10000}),
                "end_at_step": Input("INT", {"default": 10000, "min": 0, "max": 10000}),
                "return_with_leftover_noise": Input(lambda server: ["disable", "enable"]),
            },
            outputs=("LATENT",),
        ),
        NodeType(
            "VAEDecode",
            "VAE Decode",
            "latent",
            vae_decode,
            {"samples": LATENT, "vae": VAE},
            outputs=("IMAGE",),
        ),
        NodeType(
            "VAEEncode",
            "VAE Encode",
            "latent",
            vae_encode,
            {"pixels": IMAGE, "vae": VAE},
            outputs=("LATENT",),
        ),
        NodeType(
            "VAEEncodeForInpaint",
            "VAE Encode (for Inpainting)",
            "latent/inpaint",
            vae_encode_for_inpaint,
            {
                "pixels": IMAGE,
                "vae": VAE,
                "mask": MASK,
                "grow_mask_by": Input("INT", {"default": 6, "min": 0, "max": 64, "step": 1}),
            },
            outputs=("LATENT",),
        ),
        NodeType(
            "LatentUpscale",
            "Upscale Latent",
            "latent",
            upscale_latent,
            {
                "samples": LATENT,
                "upscale_method": Input(lambda server: list(UPSCALE_METHODS)),
                "width": _side(512, 0),
                "height": _side(512, 0),
                "crop": Input(lambda server: list(CROP_METHODS)),
            },
            outputs=("LATENT",),
        ),
        NodeType(
            "LatentUpscaleBy",
            "Upscale Latent By",
            "latent",
            upscale_latent_by,
            {
                "samples": LATENT,
                "upscale_method": Input(lambda server: list(UPSCALE_METHODS)),
                "scale_by": Input("FLOAT", {"default": 1.5, "min": 0.01, "max": 8.0, "step": 0.01}),
            },
            outputs=("LATENT",),
        ),
        NodeType(
            "SetLatentNoiseMask",
            "Set Latent Noise Mask",
            "latent/inpaint",
            set_noise_mask,
            {"samples": LATENT, "mask": MASK},
            outputs=("LATENT",),
        ),
        NodeType(
            "LoadImage",
            "Load Image",
            "image",
            load_image,
            {"image": Input(lambda server: server.input_images(), {"image_upload": True}, listed_only=False)},
            outputs=("IMAGE", "MASK"),
            check=_check_image,
        ),
        NodeType(
            "LoadImageMask",
            "Load Image (as Mask)",
            "mask",
            load_image_mask,
            {
                "image": Input(
                    lambda server: server.input_images(), {"image_upload": True}, listed_only=False
                ),
                "channel": Input(lambda server: ["alpha", "red", "green", "blue"]),
            },
            outputs=("MASK",),
            check=_check_image,
        ),
        NodeType(
            "ImageScale",
            "Upscale Image",
            "image/upscaling",
            scale_image,
            {
                "image": IMAGE,
                "upscale_method": Input(lambda server: [*UPSCALE_METHODS, "lanczos"]),
                "width": Input("INT", {"default": 512, "min": 0, "max": _max_side, "step": 1}),
                "height": Input("INT", {"default": 512, "min": 0, "max": _max_side, "step": 1}),
                "crop": Input(lambda server: list(CROP_METHODS)),
            },
            outputs=("IMAGE",),
        ),
        NodeType(
            "SaveImage",
            "Save Image",
            "image",
            save_image,
            {"images": IMAGE, "filename_prefix": Input("STRING", {"default": "ComfyUI"})},
            output_node=True,
            hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        ),
        NodeType(
            "PreviewImage",
            "Preview Image",
            "image",
            preview_image,
            {"images": IMAGE},
            output_node=True,
            hidden={"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        ),
        NodeType(
            "ControlNetLoader",
            "Load ControlNet Model",
            "loaders",
            load_controlnet,
            {"control_net_name": Input(lambda server: server.controlnets())},
            outputs=("CONTROL_NET",),
        ),
        NodeType(
            "ControlNetApplyAdvanced",
            "Apply ControlNet",
            "conditioning/controlnet",
            apply_controlnet,
            {
                "positive": CONDITIONING,
                "negative": CONDITIONING,
                "control_net": Input("CONTROL_NET"),
                "image": IMAGE,
                "strength": Input("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
                "start_percent": Input("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}),
                "end_percent": Input("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}),
            },
            optional={"vae": VAE},
            outputs=("CONDITIONING", "CONDITIONING"),
            output_names=("positive", "negative"),
        ),
    )
}
