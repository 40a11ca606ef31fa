"""Frozen configuration dataclasses and the named model presets.

Every network is built from one of these dataclasses (``UNet(config.unet)`` and so on); presets are a
literal dict of ``ModelConfig`` values. Field names follow the vocabulary of the Stable Diffusion
papers and configs: ``model_channels``, ``channel_mult``, ``context_dim``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from typing import Any

COORDINATE_CHANNELS = 2  # x and y
EPS_SCALING_RANGE = (0.5, 1.5)  # epsilon scaling factors accepted (as ComfyUI's Epsilon Scaling node)


@dataclass(frozen=True)
class UNetConfig:
    """The denoising U-Net of Rombach et al. 2022 (Sec. 3.3, App. F)."""

    in_channels: int = 4  # 4 for text-to-image, 9 for inpainting, 7 for the x4 upscaler
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (by channel_mult index) with transformers
    num_heads: int | None = 8  # SD1: a fixed number of heads per level ...
    head_dim: int | None = None  # ... SD2: a fixed head width (heads = channels // head_dim)
    transformer_depth: int = 1  # transformer blocks per attention level, unless transformer_depths says
    transformer_depths: tuple[int, ...] = ()  # one per level (SDXL: (0, 2, 10)); empty: the above everywhere
    transformer_depth_middle: int | None = None  # mid-block depth; None: the deepest level's, depth_at(-1)
    context_dim: int = 768
    use_linear_projection: bool = False  # SD2 projects in/out of transformers with Linear, SD1 with 1x1 conv
    only_cross_attention: tuple[bool, ...] = ()  # per level; empty means False everywhere (x4 upscaler)
    num_class_embeds: int | None = None  # x4 upscaler: noise-level class embedding
    # SDXL (Podell et al. 2023, Sec. 2.2): width of the "vector" conditioning y (pooled text embedding and
    # sinusoidal size/crop micro-conditioning) embedded by an MLP and added to the timestep embedding
    adm_in_channels: int | None = None
    norm_groups: int = 32
    norm_eps: float = 1e-5
    upcast_attention: bool = False  # compute attention scores in fp32 under reduced precision
    dropout: float = 0.0  # ResBlock dropout (training only; SD trains without)
    # Not in Stable Diffusion: append x and y coordinate maps to the input (CoordConv, Liu et al. 2018), so
    # that the network knows where it is and can put what a prompt places ("in the top left") there.
    coordinate_channels: bool = False
    # LCM-distilled U-Nets (Luo et al. 2023, Sec. 4.2): the guidance scale w enters as a sinusoidal
    # embedding of this width added to the timestep's (diffusers' time_cond_proj_dim); None: no such input
    time_cond_proj_dim: int | None = None

    @property
    def conv_in_channels(self) -> int:
        return self.in_channels + (COORDINATE_CHANNELS if self.coordinate_channels else 0)

    def heads_at(self, channels: int) -> int:
        if self.head_dim is not None:
            return channels // self.head_dim
        assert self.num_heads is not None, "UNetConfig needs num_heads or head_dim"
        return self.num_heads

    def depth_at(self, level: int) -> int:
        """Transformer blocks per spatial transformer on ``level`` (negative levels count from the end)."""
        return self.transformer_depths[level] if self.transformer_depths else self.transformer_depth

    @property
    def middle_depth(self) -> int:
        """Transformer blocks of the mid-block transformer (SDXL base: 10, as its deepest level)."""
        if self.transformer_depth_middle is not None:
            return self.transformer_depth_middle
        return self.depth_at(len(self.channel_mult) - 1)

    def only_cross_at(self, level: int) -> bool:
        return bool(self.only_cross_attention) and self.only_cross_attention[level]


# The original hint encoder (cldm's ``input_hint_block``): 16, 32, 96 and 256 channels, 8x down
DEFAULT_HINT_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """The U-Net the ControlNet copies, and its hint encoder: ``hint_in_channels`` (3: an RGB hint),
    ``hint_channels`` per stage (each stage after the first halves the resolution, so there are
    log2(latent factor) + 1 of them)."""

    unet: UNetConfig
    hint_in_channels: int = 3
    hint_channels: tuple[int, ...] = DEFAULT_HINT_CHANNELS

    @property
    def hint_factor(self) -> int:
        return 2 ** (len(self.hint_channels) - 1)


@dataclass(frozen=True)
class AutoencoderConfig:
    """The KL-regularised autoencoder (Rombach et al. 2022, Sec. 3.1 and App. G)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per level; f = 2**(levels-1)
    num_res_blocks: int = 2
    norm_groups: int = 32
    norm_eps: float = 1e-6
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    # SD 1.x/2.x/XL have 1x1 convolutions around the latent (quant_conv / post_quant_conv); SD3's has none
    use_quant_conv: bool = True
    # Pixel-space diffusion (the f = 1 baseline of Rombach et al. 2022, Sec. 4.1): no networks, the
    # "latent" is the image itself (latent_channels = in_channels, usually scaling_factor 1).
    identity: bool = False

    @property
    def downsampling_factor(self) -> int:
        return 1 if self.identity else 2 ** (len(self.block_channels) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP-architecture text transformer (Radford et al. 2021) with its tokenizer's settings."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_length: int = 77
    activation: str = "quick_gelu"  # "quick_gelu" (OpenAI CLIP, SD1) or "gelu" (OpenCLIP, SD2)
    layer_norm_eps: float = 1e-5
    skip_last_layers: int = 0  # 1 = penultimate layer (SD2); the final layer norm is applied either way
    # SDXL: the context is the penultimate layer's output without the final layer norm; every layer is built,
    # since the pooled embedding reads the last one
    context_from_penultimate: bool = False
    projection_dim: int | None = None  # bias-free projection of the pooled embedding (SDXL's bigG: 1280)
    pad_token_id: int = 49407  # SD1 pads with end-of-text, SD2 with 0
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    causal: bool = True  # CLIP's causal mask; False: every token sees the whole prompt (beyond SD)


@dataclass(frozen=True)
class ScheduleConfig:
    """The training noise schedule and its sampling conventions (as a diffusers scheduler_config.json)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # "linear", "scaled_linear" or "cosine"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction_type: str = "epsilon"  # "epsilon", "v_prediction" or "sample"
    timestep_spacing: str = "leading"  # "leading", "trailing" or "linspace"
    steps_offset: int = 1
    set_alpha_to_one: bool = False  # DDIM/PLMS: whether the last step lands on sigma 0 or sigma(t=0)
    rescale_zero_terminal_snr: bool = False
    # The noise process: "discrete" (variance preserving, the betas above) or "flow" (rectified flow,
    # x_t = (1 - t) x0 + t eps with t in [0, 1], SD3), whose network predicts the velocity eps - x0
    # (prediction_type "flow") and whose sigmas are time-shifted by ``shift`` (SD3: 3.0)
    process: str = "discrete"
    shift: float = 1.0


@dataclass(frozen=True)
class MMDiTConfig:
    """The multimodal diffusion transformer of SD3 (Esser et al. 2024, Sec. 4 and Fig. 2).

    Text and image tokens attend jointly with separate weights per stream; every block is modulated
    (adaLN-Zero) by the timestep and the pooled text embedding. SD3.5 adds RMS-normalised queries and keys
    (``qk_norm="rms_norm"``, Large and Medium) and, in MMDiT-X (Medium), a second image-only self-attention
    in the blocks listed in ``dual_attention_layers``.
    """

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    depth: int = 24  # joint blocks; hidden_size = num_heads * head_dim (the reference ties heads to depth)
    num_heads: int = 24
    head_dim: int = 64
    context_dim: int = 4096  # width of the text states (T5-XXL's; CLIP states are zero-padded to it)
    pooled_dim: int = 2048  # CLIP-L pooled (768) + bigG pooled (1280)
    pos_embed_max_size: int = 192  # side of the learned positional-embedding grid, cropped to the image
    sample_size: int = 128  # the latent side the model was trained at (1024 px)
    qk_norm: str | None = None  # None or "rms_norm"
    dual_attention_layers: tuple[int, ...] = ()
    mlp_ratio: float = 4.0

    @property
    def hidden_size(self) -> int:
        return self.num_heads * self.head_dim


@dataclass(frozen=True)
class T5Config:
    """The T5 v1.1 encoder (Raffel et al. 2020): gated-GELU feed-forward, relative position buckets,
    RMS layer norms without bias. SD3's third text encoder is T5-XXL's encoder."""

    vocab_size: int = 32128
    hidden_size: int = 4096  # d_model
    head_dim: int = 64  # d_kv
    intermediate_size: int = 10240  # d_ff
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_eps: float = 1e-6
    max_length: int = 256  # tokens per prompt as SD3's pipeline pads and truncates (max_sequence_length)
    pad_token_id: int = 0
    eos_token_id: int = 1


@dataclass(frozen=True)
class ModelConfig:
    """A complete latent diffusion model: the three networks, the schedule and the defaults."""

    name: str
    unet: UNetConfig = field(default_factory=UNetConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    # the first text encoder (None in a model without it: the SDXL refiner)
    text_encoder: TextEncoderConfig | None = field(default_factory=TextEncoderConfig)
    text_encoder_2: TextEncoderConfig | None = None  # SDXL's second text encoder (OpenCLIP ViT-bigG)
    text_encoder_3: T5Config | None = None  # SD3's T5-XXL encoder
    # The denoising network when it is not the U-Net (SD3's MMDiT; ``unet`` is then unused)
    transformer: MMDiTConfig | None = None
    family: str = "sd"  # the model family (``latentdiffusion.families.FAMILIES``) that builds and runs it
    # An empty negative prompt is a zero condition instead of the encoding of "" (SDXL base's reference
    # pipeline: diffusers' force_zeros_for_empty_prompt).
    zero_empty_negative: bool = False
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    sample_size: int = 512  # default image side in pixels
    default_sampler: str = "dpmpp_2m"
    default_sigmas: str | None = None  # used when a request names none; None = the schedule's own spacing
    default_steps: int = 20
    default_guidance_scale: float = 7.5
    default_eps_scaling: float = 1.0  # epsilon scaling when a request sets none (pipelines.sampling); 1 = off
    # Classifier-free guidance only at noise levels sigma >= this (0: every step); see ClassifierFreeGuidance
    guidance_min_sigma: float = 0.0

    def beyond_stable_diffusion(self) -> list[str]:
        """What of this model the Stable Diffusion file layouts (diffusers, CompVis) cannot describe."""
        parts = []
        if self.autoencoder.identity:
            parts.append("it works in pixel space (no autoencoder)")
        if self.unet.coordinate_channels:
            parts.append("its U-Net takes coordinate channels")
        if self.text_encoder is not None and not self.text_encoder.causal:
            parts.append("its text encoder attends without a causal mask")
        return parts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        data = dict(data)
        optional = {
            "text_encoder_2": TextEncoderConfig,
            "text_encoder_3": T5Config,
            "transformer": MMDiTConfig,
        }
        for name, part in optional.items():  # optional parts: no default factory to follow
            if isinstance(data.get(name), dict):
                data[name] = _from_dict(part, data[name])
        return _from_dict(cls, data)


def _from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) frozen dataclass from ``asdict`` output; lists become tuples again."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        factory = known[name].default_factory
        if isinstance(value, dict) and callable(factory) and is_dataclass(factory):
            value = _from_dict(factory, value)
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


SD15 = ModelConfig(name="sd15")

SD21 = ModelConfig(
    name="sd21",
    unet=UNetConfig(num_heads=None, head_dim=64, context_dim=1024, use_linear_projection=True),
    text_encoder=TextEncoderConfig(
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=4096,
        activation="gelu",
        skip_last_layers=1,
        pad_token_id=0,
    ),
)

TINY = ModelConfig(
    name="tiny",
    unet=UNetConfig(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_levels=(1,),
        num_heads=2,
        context_dim=32,
    ),
    autoencoder=AutoencoderConfig(block_channels=(32, 64), num_res_blocks=1),
    text_encoder=TextEncoderConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
    sample_size=64,
)

# The project's default model (trained by `ldm train-autoencoder --preset shapes-autoencoder` and
# `ldm train --preset shapes`, see docs/default-model.md): an f=4 KL autoencoder with few channels, a small
# text-conditioned U-Net on 16x16x4 latents and a small CLIP-architecture text encoder trained jointly
# from scratch, as the LDM paper's smaller models were.
SHAPES = ModelConfig(
    name="shapes",
    unet=UNetConfig(
        model_channels=64,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_levels=(1, 2),
        num_heads=4,
        context_dim=128,
        # positions in prompts ("in the top left") need them, see docs/default-model.md
        coordinate_channels=True,
    ),
    autoencoder=AutoencoderConfig(block_channels=(32, 64, 64), num_res_blocks=1, norm_groups=16),
    # no causal mask: "red" in "a red circle left of a blue square" can then carry its side
    # (docs/default-model.md)
    text_encoder=TextEncoderConfig(
        hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, max_length=32, causal=False
    ),
    # v-prediction on a zero-terminal-SNR schedule, sampled with trailing timesteps (Lin et al. 2024,
    # "Common Diffusion Noise Schedules and Sample Steps are Flawed"): the layout of a 16x16 latent is still
    # visible in x_t at SD's last training step, and an eps loss hardly weighs the layout at high noise, so
    # the model ignored positions in prompts until it was trained this way (docs/default-model.md).
    schedule=ScheduleConfig(
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        steps_offset=0,
        rescale_zero_terminal_snr=True,
    ),
    sample_size=64,
    default_guidance_scale=3.0,  # measured best on eval-shapes (README)
)

# SDXL base 1.0 (Podell et al. 2023) and its refiner, as Stability AI released them.
CLIP_VIT_L_PENULTIMATE = TextEncoderConfig(context_from_penultimate=True)
OPENCLIP_VIT_BIGG = TextEncoderConfig(
    hidden_size=1280,
    num_layers=32,
    num_heads=20,
    intermediate_size=5120,
    activation="gelu",
    pad_token_id=0,
    context_from_penultimate=True,
    projection_dim=1280,
)
SDXL_AUTOENCODER = AutoencoderConfig(scaling_factor=0.13025)
SDXL = ModelConfig(
    name="sdxl",
    family="sdxl",
    unet=UNetConfig(
        channel_mult=(1, 2, 4),
        attention_levels=(1, 2),
        num_heads=None,
        head_dim=64,
        transformer_depths=(0, 2, 10),
        context_dim=2048,
        use_linear_projection=True,
        adm_in_channels=2816,  # 1280 pooled + 6 x 256
    ),
    autoencoder=SDXL_AUTOENCODER,
    text_encoder=CLIP_VIT_L_PENULTIMATE,
    text_encoder_2=OPENCLIP_VIT_BIGG,
    sample_size=1024,
    default_steps=30,
    default_guidance_scale=5.0,
    zero_empty_negative=True,
)
SDXL_REFINER = replace(
    SDXL,
    name="sdxl-refiner",
    family="sdxl-refiner",
    unet=UNetConfig(
        model_channels=384,
        channel_mult=(1, 2, 4, 4),
        attention_levels=(1, 2),
        num_heads=None,
        head_dim=64,
        transformer_depth=4,
        context_dim=1280,
        use_linear_projection=True,
        adm_in_channels=2560,  # 1280 pooled + 5 x 256
    ),
    text_encoder=None,
    zero_empty_negative=False,
)

# Stable Diffusion 3 Medium and 3.5 Large / Large Turbo / Medium (Esser et al. 2024), as Stability AI
# released them; their defaults (steps, guidance) are those of the model cards.
SD3_AUTOENCODER = AutoencoderConfig(
    latent_channels=16, use_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609
)
SD3_SCHEDULE = ScheduleConfig(process="flow", prediction_type="flow", shift=3.0)
SD3_MEDIUM = ModelConfig(
    name="sd3-medium",
    family="sd3",
    transformer=MMDiTConfig(depth=24, num_heads=24, pos_embed_max_size=192),
    autoencoder=SD3_AUTOENCODER,
    text_encoder=replace(CLIP_VIT_L_PENULTIMATE, projection_dim=768),
    text_encoder_2=OPENCLIP_VIT_BIGG,
    text_encoder_3=T5Config(),
    schedule=SD3_SCHEDULE,
    sample_size=1024,
    default_sampler="euler",
    default_steps=28,
    default_guidance_scale=7.0,
)
SD35_LARGE = replace(
    SD3_MEDIUM,
    name="sd35-large",
    transformer=MMDiTConfig(depth=38, num_heads=38, pos_embed_max_size=192, qk_norm="rms_norm"),
    default_guidance_scale=3.5,
)
SD35_MEDIUM = replace(
    SD3_MEDIUM,
    name="sd35-medium",
    transformer=MMDiTConfig(
        depth=24,
        num_heads=24,
        pos_embed_max_size=384,
        qk_norm="rms_norm",
        dual_attention_layers=tuple(range(13)),
    ),
    default_steps=40,
    default_guidance_scale=4.5,
)

PRESETS: dict[str, ModelConfig] = {
    "sd15": SD15,
    "sd15-inpaint": replace(SD15, name="sd15-inpaint", unet=replace(SD15.unet, in_channels=9)),
    "sd21": SD21,
    "sd21-v": replace(
        SD21,
        name="sd21-v",
        sample_size=768,
        schedule=replace(SD21.schedule, prediction_type="v_prediction"),
    ),
    "sd-x4-upscaler": ModelConfig(
        name="sd-x4-upscaler",
        unet=UNetConfig(
            in_channels=7,
            model_channels=256,
            channel_mult=(1, 2, 2, 4),
            attention_levels=(1, 2, 3),
            num_heads=8,
            context_dim=1024,
            use_linear_projection=True,
            only_cross_attention=(True, True, True, False),
            num_class_embeds=1000,
        ),
        autoencoder=AutoencoderConfig(block_channels=(128, 256, 512), scaling_factor=0.08333),
        text_encoder=SD21.text_encoder,
        schedule=ScheduleConfig(
            beta_schedule="scaled_linear", beta_start=0.0001, beta_end=0.02, prediction_type="v_prediction"
        ),
        sample_size=512,
        default_steps=75,
        default_guidance_scale=9.0,
    ),
    "sdxl": SDXL,
    "sdxl-refiner": SDXL_REFINER,
    "sd3-medium": SD3_MEDIUM,
    "sd35-large": SD35_LARGE,
    # distilled for few steps without guidance (guidance 1 runs the conditional side alone)
    "sd35-large-turbo": replace(
        SD35_LARGE, name="sd35-large-turbo", default_steps=4, default_guidance_scale=1.0
    ),
    "sd35-medium": SD35_MEDIUM,
    "tiny": TINY,
    "shapes": SHAPES,
}


def get_preset(name: str) -> ModelConfig:
    """Return the preset called ``name``, or raise a ValueError that lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
