"""AnimateDiff motion-module files: key tables, version detection, loading, saving and motion LoRA.

Two layouts of the same weights (Guo et al. 2024; ``models.motion`` names ours):
  original  AnimateDiff's ``mm_sd_v14.ckpt`` (v1), ``mm_sd_v15_v2.ckpt`` (v2), ``v3_sd15_mm.ckpt`` (v3):
            ``down_blocks.{i}.motion_modules.{j}.temporal_transformer.transformer_blocks.{k}.
            attention_blocks.{0,1}.{to_q,to_k,to_v,to_out.0,pos_encoder.pe}``, ``norms.{0,1}``,
            ``ff_norm``, ``ff.net.{0.proj,2}``; ``.ckpt`` (safe pickle) or ``.safetensors``
  diffusers a ``MotionAdapter`` folder (config.json + diffusion_pytorch_model.*): the same without
            ``temporal_transformer.``, with ``attn1/attn2``, ``norm1..3`` and one ``pos_embed.pe`` per block
The version is read from the keys: a mid-block module means v2; otherwise a 24-frame position table
means v1, a 32-frame one v3. Motion LoRA files (AnimateDiff's ``v2_lora_*.ckpt``) hold
``....attention_blocks.{a}.processor.to_{q,k,v,out}_lora.{down,up}.weight`` in the original layout.
Modules whose second attention reads the prompt (AnimateDiff's ``("Temporal_Self", "Temporal_Cross")``
block types; ``MotionConfig.cross_attention_dim``) keep the original layout, with that attention's to_k and
to_v taking the text width; the files written here say so in their metadata (``attention_block_types``),
which also settles a text width equal to the module's own; diffusers' MotionAdapter has no such modules.
Modules with a spatio-temporal convolution (``MotionConfig.spacetime_conv``, trained here) add
``temporal_transformer.spacetime_conv.{norm,conv}.{weight,bias}`` to each module; the keys say so.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from latentdiffusion.checkpoints.diffusers_folder import read_json, read_weights
from latentdiffusion.checkpoints.keymap import KeyTable, load_exact_state, rename_key, rename_keys
from latentdiffusion.checkpoints.safe_io import read_metadata, read_state_dict, save_safetensors
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import MotionConfig, MotionModules, check_noise_correlation

WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# AnimateDiff's modules: 8 heads, GroupNorm of 32 groups; the files do not record either.
ORIGINAL_HEADS, ORIGINAL_GROUPS = 8, 32
V1_FRAMES = 24
BLOCK_TYPES_KEY = "attention_block_types"
NOISE_KEY = "noise_correlation"  # the mixed noise prior's alpha (models.motion.mixed_noise), when not 0
FIRST_FRAME_KEY = "first_frame"  # "true" for modules that animate a given first frame (MotionConfig)
SELF_TYPES, CROSS_TYPES = "Temporal_Self,Temporal_Self", "Temporal_Self,Temporal_Cross"

# (ours, original, diffusers) inside one transformer block (ours "blocks.{k}.", theirs
# "transformer_blocks.{k}."); the most specific first.
_INNER = (
    ("pos_embed", "attention_blocks.0.pos_encoder", "pos_embed"),
    ("attn1.to_out", "attention_blocks.0.to_out.0", "attn1.to_out.0"),
    ("attn2.to_out", "attention_blocks.1.to_out.0", "attn2.to_out.0"),
    ("attn1", "attention_blocks.0", "attn1"),
    ("attn2", "attention_blocks.1", "attn2"),
    ("norm1", "norms.0", "norm1"),
    ("norm2", "norms.1", "norm2"),
    ("norm3", "ff_norm", "norm3"),
    ("ff.proj_in", "ff.net.0.proj", "ff.net.0.proj"),
    ("ff.proj_out", "ff.net.2", "ff.net.2"),
)
# (ours, theirs) prefix of one temporal transformer; the original layout adds "temporal_transformer.".
_OUTER = (
    ("down_blocks.{}.{}.", "down_blocks.{}.motion_modules.{}."),
    ("mid_block.{}.", "mid_block.motion_modules.{}."),
    ("up_blocks.{}.{}.", "up_blocks.{}.motion_modules.{}."),
)


def _table(original: bool) -> KeyTable:
    column = 1 if original else 2
    inner = "temporal_transformer." if original else ""
    rows = [
        (ours + "blocks.{}." + row[0], theirs + inner + "transformer_blocks.{}." + row[column])
        for ours, theirs in _OUTER
        for row in _INNER
    ]
    return rows + [(ours, theirs + inner) for ours, theirs in _OUTER]


ORIGINAL_TABLE: KeyTable = _table(original=True)
DIFFUSERS_TABLE: KeyTable = _table(original=False)
_SECOND_PE = re.compile(r"attention_blocks\.(\d+)\.pos_encoder\.pe$")


def from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original-layout keys -> ours. Each of a block's two attentions carries its own copy of the position
    table; ours keeps one per block (the first attention's)."""
    kept = {k: v for k, v in state.items() if (m := _SECOND_PE.search(k)) is None or m.group(1) == "0"}
    return rename_keys(kept, ORIGINAL_TABLE, reverse=True)


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the original layout (the position table written for both attentions, as AnimateDiff does)."""
    renamed = rename_keys(state, ORIGINAL_TABLE)
    for key in [k for k in renamed if k.endswith("attention_blocks.0.pos_encoder.pe")]:
        renamed[key.replace("attention_blocks.0.", "attention_blocks.1.")] = renamed[key]
    return renamed


def from_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return rename_keys(state, DIFFUSERS_TABLE, reverse=True)


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return rename_keys(state, DIFFUSERS_TABLE)


def detect_config(
    shapes: dict[str, tuple[int, ...]], source: str, metadata: dict[str, str] | None = None
) -> MotionConfig:
    """The MotionConfig of a state dict in our names, from its shapes (heads and norm groups are not in
    the weights: AnimateDiff's 8 and 32) and the file's metadata, if any (``attention_block_types``,
    ``noise_correlation``, ``first_frame``)."""
    metadata = metadata or {}
    levels = _count(shapes, r"down_blocks\.(\d+)\.0\.norm\.weight")
    if not levels:
        raise UserError(f"{source}: not an AnimateDiff motion module (no down_blocks.0 motion modules)")
    channels = tuple(shapes[f"down_blocks.{i}.0.norm.weight"][0] for i in range(levels))
    layers = _count(shapes, r"down_blocks\.0\.(\d+)\.norm\.weight")
    depth = _count(shapes, r"down_blocks\.0\.0\.blocks\.(\d+)\.norm1\.weight")
    pe = shapes.get("down_blocks.0.0.blocks.0.pos_embed.pe")
    config = MotionConfig(
        block_channels=channels,
        layers=layers,
        mid_block="mid_block.0.norm.weight" in shapes,
        heads=ORIGINAL_HEADS,
        norm_groups=ORIGINAL_GROUPS,
        max_frames=pe[1] if pe is not None else MotionConfig.max_frames,
        depth=depth,
        cross_attention_dim=_cross_attention_dim(shapes, channels[0], metadata.get(BLOCK_TYPES_KEY), source),
        noise_correlation=check_noise_correlation(metadata.get(NOISE_KEY, "0"), f"{source}: {NOISE_KEY}"),
        first_frame=_first_frame(metadata.get(FIRST_FRAME_KEY, "false"), source),
        spacetime_conv="down_blocks.0.0.spacetime_conv.conv.weight" in shapes,
    )
    if _count(shapes, r"up_blocks\.0\.(\d+)\.norm\.weight") != layers + 1:
        raise UserError(f"{source}: the up-path motion modules do not match the down path's ({layers} + 1)")
    return config


def _first_frame(value: str, source: str) -> bool:
    if value not in ("true", "false"):
        raise UserError(f"{source}: metadata {FIRST_FRAME_KEY} must be true or false, got {value!r}")
    return value == "true"


def _cross_attention_dim(
    shapes: dict[str, tuple[int, ...]], channels: int, block_types: str | None, source: str
) -> int | None:
    """The text width of the second attention's keys when it is a cross-attention, else None: as the
    metadata says, or (without it) as a key projection narrower or wider than the module."""
    key = shapes.get("down_blocks.0.0.blocks.0.attn2.to_k.weight")
    width = None if key is None else key[1]
    if block_types is None:
        return width if width is not None and width != channels else None
    if block_types not in (SELF_TYPES, CROSS_TYPES):
        raise UserError(f"{source}: unsupported {BLOCK_TYPES_KEY} {block_types!r}")
    if block_types == SELF_TYPES:
        return None
    return width


def _count(shapes: dict[str, Any], pattern: str) -> int:
    """1 + the largest index that ``pattern``'s group takes over the keys (0 if none matches)."""
    found = [int(m.group(1)) for k in shapes if (m := re.fullmatch(pattern, k))]
    return max(found) + 1 if found else 0


def version(config: MotionConfig) -> str:
    """The AnimateDiff release these modules look like: v2 has a mid-block module, v1 a 24-frame table."""
    if config.mid_block:
        return "v2"
    return "v1" if config.max_frames == V1_FRAMES else "v3"


def config_from_diffusers(data: dict[str, Any], source: str) -> MotionConfig:
    """Our MotionConfig from a diffusers ``MotionAdapter`` config.json."""
    if data.get("_class_name", "MotionAdapter") != "MotionAdapter":
        raise UserError(f"{source}: a {data['_class_name']}, not a MotionAdapter")
    if data.get("conv_in_channels"):
        raise UserError(
            f"{source}: motion adapters with their own conv_in (image-to-video) are not supported"
        )
    options = {}
    for name, key in (
        ("layers", "motion_layers_per_block"),
        ("depth", "motion_transformer_layers_per_block"),
        ("heads", "motion_num_attention_heads"),
    ):
        options[name] = _single(data.get(key, getattr(MotionConfig, name)), key, source)
    mid = bool(data.get("use_motion_mid_block", True))
    for key in ("motion_mid_block_layers_per_block", "motion_transformer_layers_per_mid_block"):
        if mid and _single(data.get(key, 1), key, source) != 1:
            raise UserError(f"{source}: {key} other than 1 is not supported")
    return MotionConfig(
        block_channels=tuple(data.get("block_out_channels", MotionConfig.block_channels)),
        mid_block=mid,
        norm_groups=int(data.get("motion_norm_num_groups", 32)),
        max_frames=int(data.get("motion_max_seq_length", 32)),
        **options,
    )


def _single(value: Any, key: str, source: str) -> int:
    values = value if isinstance(value, list | tuple) else [value]
    if any(isinstance(v, list | tuple) for v in values) or len(set(values)) != 1:
        raise UserError(f"{source}: {key} {value!r} varies between levels, which is not supported")
    return int(values[0])


def load_motion_modules(source: str | Path, dtype: torch.dtype | None = None) -> MotionModules:
    """Motion modules from an original-layout file (.ckpt/.safetensors) or a diffusers MotionAdapter
    folder (or a single file in diffusers' names)."""
    path = Path(source)
    if path.is_dir():
        config = config_from_diffusers(read_json(path / "config.json"), str(path))
        state = from_diffusers(read_weights(path, WEIGHT_NAMES))
        detected = detect_config(_shapes(state), str(path))
        if replace(detected, heads=config.heads, norm_groups=config.norm_groups) != config:
            raise UserError(f"{path}: the weights do not fit config.json ({detected} vs {config})")
    elif path.is_file():
        raw = read_state_dict(path)
        original = any(".temporal_transformer." in k for k in raw)
        state = from_original(raw) if original else from_diffusers(raw)
        config = detect_config(_shapes(state), str(path), read_metadata(path))
    else:
        raise UserError(f"motion module {source} not found (expected a file or a MotionAdapter folder)")
    return _build(config, state, str(path), dtype)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _build(config: MotionConfig, state: dict, source: str, dtype: torch.dtype | None) -> MotionModules:
    modules = MotionModules(config)
    expected = modules.state_dict()
    for key in expected:  # a file without position tables gets the sinusoid its config implies
        if key.endswith(".pos_embed.pe"):
            state.setdefault(key, expected[key])
    load_exact_state(modules, state, source, "the motion modules they look like")
    modules.eval().requires_grad_(False)
    return modules.to(dtype) if dtype is not None else modules


def save_motion_modules(modules: MotionModules, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write ``modules`` as an original-layout .safetensors file (what AnimateDiff tools load)."""
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in modules.state_dict().items()
    }
    config = modules.config
    metadata = {BLOCK_TYPES_KEY: SELF_TYPES if config.cross_attention_dim is None else CROSS_TYPES}
    if config.noise_correlation:
        metadata[NOISE_KEY] = repr(float(config.noise_correlation))
    if config.first_frame:
        metadata[FIRST_FRAME_KEY] = "true"
    save_safetensors(to_original(state), Path(path), metadata)
    return Path(path)


_LORA = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.down\.weight$")


def merge_motion_lora(modules: MotionModules, source: str | Path, strength: float = 1.0) -> int:
    """Add ``strength * up @ down`` of an AnimateDiff motion LoRA file to the temporal attentions'
    projections (as AnimateDiff merges them: no rank or alpha scaling); returns the number of layers
    changed. Entries for a mid block that these modules lack are skipped (v2 LoRAs on v3 modules)."""
    lora = read_state_dict(Path(source))
    targets = dict(modules.named_parameters())
    changed = 0
    with torch.no_grad():
        for key, down in lora.items():
            match = _LORA.match(key)
            if match is None:
                continue
            projection = match.group(2) + (".0" if match.group(2) == "to_out" else "")
            ours = rename_key(f"{match.group(1)}.{projection}.weight", ORIGINAL_TABLE, reverse=True)
            if ours.startswith("mid_block.") and modules.mid_block is None:
                continue
            up = lora.get(key.replace(".down.weight", ".up.weight"))
            weight = targets.get(ours)
            if up is None or weight is None or up.shape[1] != down.shape[0]:
                raise UserError(f"{source}: {key} does not fit these motion modules (or has no up weight)")
            delta = up.float() @ down.float()
            if delta.shape != weight.shape:
                raise UserError(f"{source}: {key} is {list(delta.shape)}, the layer is {list(weight.shape)}")
            weight.add_(strength * delta.to(weight.device, weight.dtype))
            changed += 1
    if not changed:
        raise UserError(
            f"{source}: not an AnimateDiff motion LoRA (no ...processor.to_q_lora.down.weight keys)"
        )
    return changed
