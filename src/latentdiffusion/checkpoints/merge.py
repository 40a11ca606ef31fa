"""Merging checkpoints tensor by tensor, as AUTOMATIC1111's checkpoint merger does.

Methods (per tensor, with ratio a):
- ``weighted-sum``: (1 - a) A + a B, an interpolation between two fine-tunes of one base;
- ``add-difference``: A + a (B - C), which adds what training B from C changed to A ("task
  arithmetic": Ilharco et al. 2023, "Editing Models with Task Arithmetic", Eq. 1 with tau = B - C).

The ratio is ``alpha``, or per U-Net block with ``block_weights`` (``merge_blocks``: IN/M/OUT values,
optionally BASE first, which then weighs the text encoders, autoencoder and the embeddings before the
first block). ``keep_text_encoder`` / ``keep_vae`` copy those networks from A unchanged.

Rules: the inputs are single-file ``.safetensors`` checkpoints of one family (SD 1.x, SD 2.x, SDXL, ...
as ``single_file.read_plan`` detects them); the output has exactly A's keys. Every network tensor of A
must be in B (and C) with A's shape, with one exception kept from AUTOMATIC1111: an inpainting A (U-Net
input convolution with more input channels than B's) gets the merge in the channels B has and keeps its
extra (mask and masked-image) channels. Tensors outside the networks (schedule buffers, markers) and
integer tensors are A's. Arithmetic is float32 (float64 inputs stay float64); each output tensor has
A's dtype unless ``dtype`` is given. The safetensors metadata records the recipe (``sd_merge_recipe``,
the key AUTOMATIC1111 writes) and keeps A's ``latentdiffusion.config``.

Memory: inputs are read one tensor at a time and the output is streamed (``safetensors_stream``), so a
merge holds a few tensors, not a model (benchmarks/merge_memory.py measures it).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from latentdiffusion.checkpoints.keymap import first_keys
from latentdiffusion.checkpoints.merge_blocks import (
    BlockWeights,
    count_input_blocks,
    parse_block_weights,
    unet_block,
)
from latentdiffusion.checkpoints.safe_io import (
    SafetensorsHeader,
    file_kind,
    meta_tensors,
    read_safetensors_header,
)
from latentdiffusion.checkpoints.safetensors_stream import TensorSpec, read_tensor, write_streamed
from latentdiffusion.checkpoints.single_file import (
    CONFIG_METADATA,
    SingleFilePlan,
    find_yaml,
    read_plan,
    single_file_layouts,
)
from latentdiffusion.errors import UserError

METHODS = ("weighted-sum", "add-difference")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RECIPE_METADATA = "sd_merge_recipe"
CHUNK_ELEMENTS = 2**21  # elements merged at a time: 8 MB per float32 operand
INPUT_CONV = "input_blocks.0.0.weight"  # the U-Net's first convolution (inpainting models: 9 channels)


@dataclass(frozen=True)
class MergeInput:
    """A checkpoint to merge: its validated header and detected architecture (no tensor read yet)."""

    path: Path
    header: SafetensorsHeader
    plan: SingleFilePlan

    @property
    def description(self) -> str:
        return f"{self.path.name} ({self.plan.variant})"


@dataclass(frozen=True)
class Recipe:
    method: str
    alpha: float
    blocks: BlockWeights | None
    keep_roles: frozenset[str]
    dtype: torch.dtype | None


def open_input(path: str | Path) -> MergeInput:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"model {path} does not exist")
    if file_kind(path) != "safetensors":
        raise UserError(f"{path}: merging reads .safetensors single files; convert it first (ldm convert)")
    header = read_safetensors_header(path)
    return MergeInput(path, header, read_plan(path, meta_tensors(header)))


def merge(
    a: str | Path,
    b: str | Path,
    c: str | Path | None = None,
    *,
    method: str = "weighted-sum",
    alpha: float = 0.5,
    block_weights: str | Sequence[float] | None = None,
    output: str | Path,
    dtype: torch.dtype | str | None = None,
    keep_text_encoder: bool = False,
    keep_vae: bool = False,
) -> Path:
    """Merge single-file checkpoints A and B (and C for add-difference) into ``output`` (module doc)."""
    if method not in METHODS:
        raise UserError(f"unknown merge method {method!r}; use one of {', '.join(METHODS)}")
    if (c is None) == (method == "add-difference"):
        raise UserError("add-difference merges three models (A + alpha (B - C)); weighted-sum merges two")
    if not math.isfinite(alpha):
        raise UserError(f"alpha must be a finite number, got {alpha}")
    if isinstance(dtype, str) and dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    inputs = [open_input(path) for path in (a, b, c) if path is not None]
    _check_family(inputs)
    roles = network_prefixes(inputs[0].plan)
    recipe = Recipe(
        method,
        float(alpha),
        _block_weights(block_weights, inputs[0]) if block_weights is not None else None,
        _kept_roles(roles, keep_text_encoder, keep_vae),
        DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype,
    )
    plan = plan_keys(inputs, roles, recipe)
    specs = [_spec(inputs[0], key, recipe.dtype) for key in plan]
    output = Path(output)
    write_streamed(
        output, specs, lambda spec: _merged(inputs, spec, plan[spec.name], recipe), _metadata(inputs, recipe)
    )
    _copy_yaml(inputs[0].path, output)
    return output


# ------------------------------------------------------------------------------------------ checks


def _check_family(inputs: list[MergeInput]) -> None:
    """One family and base architecture; an inpainting A with a text-to-image B/C is allowed (module doc)."""
    first = inputs[0]
    for other in inputs[1:]:
        same_family = other.plan.config.family == first.plan.config.family
        if not same_family or _base_variant(other.plan) != _base_variant(first.plan):
            raise UserError(
                f"cannot merge {first.description} with {other.description}: the models must be of one "
                "family (SD 1.x, SD 2.x, SDXL, ...)"
            )
        if other.plan.variant.endswith("-inpaint") and not first.plan.variant.endswith("-inpaint"):
            raise UserError(
                f"{other.description} is an inpainting model and A ({first.description}) is not; "
                "make the inpainting model A"
            )


def _base_variant(plan: SingleFilePlan) -> str:
    return plan.variant.removesuffix("-inpaint")


def network_prefixes(plan: SingleFilePlan) -> list[tuple[str, str]]:
    """(key prefix, role) of each network stored in the file, longest prefix first."""
    layouts = single_file_layouts(plan.config, plan.text_kind)
    pairs = [(layout.prefix, role) for role, layout in layouts.items()]
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def _kept_roles(roles: list[tuple[str, str]], keep_text: bool, keep_vae: bool) -> frozenset[str]:
    kept = {role for _, role in roles if keep_text and role.startswith("text_encoder")}
    return frozenset(kept | ({"autoencoder"} if keep_vae else set()))


def _block_weights(values: str | Sequence[float], a: MergeInput) -> BlockWeights:
    prefix = dict((role, prefix) for prefix, role in network_prefixes(a.plan)).get("unet")
    if prefix is None:
        raise UserError(f"{a.description} has no U-Net; block weights apply to U-Net models only")
    keys = [k[len(prefix) :] for k in a.header.entries if k.startswith(prefix)]
    return parse_block_weights(values, count_input_blocks(keys))


def _role_of(key: str, roles: list[tuple[str, str]]) -> str | None:
    return next((role for prefix, role in roles if key.startswith(prefix)), None)


@dataclass(frozen=True)
class KeyPlan:
    ratio: float | None  # None: A's tensor unchanged
    channels: int | None = None  # an inpainting A: merge only the first ``channels`` input channels


def plan_keys(inputs: list[MergeInput], roles: list[tuple[str, str]], recipe: Recipe) -> dict[str, KeyPlan]:
    """Each key of A and how it is made; every missing or misshapen tensor of B / C refused up front."""
    a = inputs[0]
    unet_prefix = dict((role, prefix) for prefix, role in roles).get("unet", "")
    input_blocks = len(recipe.blocks.blocks) // 2 if recipe.blocks else 0
    plans, missing, misshapen = {}, [], []
    for key, entry in a.header.entries.items():
        role = _role_of(key, roles)
        if role is None or role in recipe.keep_roles or not entry.dtype.is_floating_point:
            plans[key] = KeyPlan(None)
            continue
        ratio = recipe.alpha
        if recipe.blocks is not None:
            block = unet_block(key[len(unet_prefix) :], input_blocks) if role == "unet" else "BASE"
            ratio = recipe.blocks.ratio(block, recipe.alpha)
        channels = None
        if len({o.header.entries[key].shape for o in inputs[1:] if key in o.header.entries}) > 1:
            misshapen.append(f"{key} (B and C differ)")
        for other in inputs[1:]:
            theirs = other.header.entries.get(key)
            if theirs is None:
                missing.append(f"{key} (not in {other.path.name})")
            elif theirs.shape != entry.shape:
                channels = _inpainting_channels(key[len(unet_prefix) :], entry.shape, theirs.shape)
                if channels is None:
                    misshapen.append(f"{key} ({entry.shape} in A, {theirs.shape} in {other.path.name})")
        plans[key] = KeyPlan(ratio, channels)
    _refuse(missing, "tensors missing", a)
    _refuse(misshapen, "tensors of other shapes", a)
    return plans


def _inpainting_channels(key: str, ours: tuple[int, ...], theirs: tuple[int, ...]) -> int | None:
    """B's input channels when A is an inpainting U-Net (more input channels, all else equal)."""
    if key != INPUT_CONV or len(ours) != 4 or len(theirs) != 4:
        return None
    if ours[0] == theirs[0] and ours[2:] == theirs[2:] and ours[1] > theirs[1]:
        return theirs[1]
    return None


def _refuse(problems: list[str], what: str, a: MergeInput) -> None:
    if problems:
        raise UserError(
            f"cannot merge: {len(problems)} {what} that {a.path.name} (A) has: {first_keys(problems, 3)}"
        )


# ------------------------------------------------------------------------------------------ merging


def _spec(a: MergeInput, key: str, dtype: torch.dtype | None) -> TensorSpec:
    entry = a.header.entries[key]
    cast = dtype is not None and entry.dtype.is_floating_point
    return TensorSpec(key, dtype if cast else entry.dtype, entry.shape)


def _merged(inputs: list[MergeInput], spec: TensorSpec, plan: KeyPlan, recipe: Recipe) -> torch.Tensor:
    """The output tensor of one key (inputs read now, released when it is written)."""
    a = read_tensor(inputs[0].path, inputs[0].header, spec.name)
    if plan.ratio is None:
        return a.to(spec.dtype)
    others = [read_tensor(m.path, m.header, spec.name) for m in inputs[1:]]
    wide = torch.float64 if a.dtype == torch.float64 else torch.float32

    def merged(*parts: torch.Tensor) -> torch.Tensor:
        return merge_tensors(recipe.method, plan.ratio, *(part.to(wide) for part in parts))

    if plan.channels is None:
        return _by_rows(merged, torch.empty(spec.shape, dtype=spec.dtype), a, *others)
    out = a.to(wide)
    out[:, : plan.channels] = merged(out[:, : plan.channels], *others)
    return out.to(spec.dtype)


def _by_rows(merged: Callable[..., torch.Tensor], out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
    """``out[rows] = merged(inputs[rows])`` in slices of about ``CHUNK_ELEMENTS``: the float32
    temporaries of a large tensor (SD's 49408 x 768 token embedding) stay small."""
    if out.ndim == 0:
        out.copy_(merged(*inputs))
        return out
    rows = max(1, CHUNK_ELEMENTS // max(1, out[0].numel()))
    for start in range(0, out.shape[0], rows):
        out[start : start + rows] = merged(*(t[start : start + rows] for t in inputs))
    return out


def merge_tensors(
    method: str, ratio: float, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None
) -> torch.Tensor:
    """One tensor: (1 - ratio) a + ratio b, or a + ratio (b - c)."""
    if method == "weighted-sum":
        return (1 - ratio) * a + ratio * b
    return a + ratio * (b - c)


def _metadata(inputs: list[MergeInput], recipe: Recipe) -> dict[str, str]:
    metadata = {}
    saved = inputs[0].header.metadata.get(CONFIG_METADATA)
    if saved is not None:
        metadata[CONFIG_METADATA] = saved
    blocks = recipe.blocks
    metadata[RECIPE_METADATA] = json.dumps(
        {
            "type": "latentdiffusion",
            "method": recipe.method,
            "alpha": recipe.alpha,
            "block_weights": None if blocks is None else {"BASE": blocks.base, **blocks.blocks},
            "kept_from_a": sorted(recipe.keep_roles),
            "dtype": None if recipe.dtype is None else str(recipe.dtype).removeprefix("torch."),
            "models": [m.path.name for m in inputs],
        }
    )
    return metadata


def _copy_yaml(a: Path, output: Path) -> None:
    """A's CompVis .yaml beside the output, so tools that need one read the merge as they read A."""
    yaml = find_yaml(a)
    if yaml is not None and yaml.is_file() and find_yaml(output) is None:
        output.with_suffix(yaml.suffix).write_text(yaml.read_text())
