"""A LoRA file from a fine-tune and its base: the best low-rank approximation of each layer's change.

For each adaptable layer of the U-Net and the text encoders, the change dW = W_tuned - W_base (a
convolution's flattened to [out, in * k * k]) is replaced by its truncated SVD: with dW = U S V^T,
B = U_r S_r^(1/2) and A = S_r^(1/2) V_r^T give B A, the closest matrix of rank r to dW in the Frobenius
and spectral norms (Eckart & Young 1936), error sqrt(sum_{i > r} s_i^2). The square root of S goes to
both factors so that neither overflows in float16. This is what kohya's ``extract_lora_from_models.py``
computes (it puts all of S into B); a change of rank <= r is recovered exactly.

Layers are those kohya's LoRA adapts (``models.lora.TARGETS``): the transformer blocks' attention,
feed-forward and projection layers and the text encoders' attention and MLP layers, at ``rank``; and,
unless ``conv_rank`` is 0, the ResBlocks and down/upsamplers, LoCon-style (kohya's ``--conv_dim``): a
3x3 convolution becomes ``lora_down`` with the 3x3 kernel and ``lora_up`` 1x1, at ``conv_rank``
(default: ``rank``), and their linear and 1x1 layers take ``rank``. ``conv_rank=0`` gives kohya's
default plain LoRA of the transformer blocks only. Layers whose change is no larger than
``min_difference`` (an unchanged text encoder) are left out. The file is kohya-named (``lora_unet_``,
``lora_te_`` or SDXL's ``lora_te1_`` / ``lora_te2_``, ``.alpha`` = the layer's rank, so its scale is
1), readable by ``Pipeline.load_lora``, AUTOMATIC1111, ComfyUI and diffusers' ``load_lora_weights``.

Memory: single-file ``.safetensors`` models are streamed. Their architecture comes from the header (as
``ld.load`` decides it) and the networks are built on the meta device; a first pass reads each layer's
two weights (``safetensors_stream.read_tensor``) to find the changed layers, which fixes every entry's
name and shape, so the output's header is written first; then each layer's weights are read again, its
factors computed and written (``write_streamed``, atomically). A run holds one layer's weights and SVD,
not the models (benchmarks/extract_memory.py measures it). Other inputs (model folders, pickles) are
loaded whole in float32, as before.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from latentdiffusion.checkpoints.assemble import check_shapes_first
from latentdiffusion.checkpoints.keymap import match_template, rename_key
from latentdiffusion.checkpoints.layout import Layout, read_layout
from latentdiffusion.checkpoints.lora_keys import kohya_metadata, kohya_name, split_part
from latentdiffusion.checkpoints.safe_io import file_kind, meta_tensors, read_safetensors_header
from latentdiffusion.checkpoints.safetensors_stream import TensorSpec, read_tensor, write_streamed
from latentdiffusion.checkpoints.single_file import read_plan, single_file_layouts, split_single_file
from latentdiffusion.components import Components
from latentdiffusion.config import ModelConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families import family_of
from latentdiffusion.families.base import Family
from latentdiffusion.models.lora import TARGETS

UNET_TARGETS = ("attention", "ff", "proj")
CONV_TARGETS = ("resnets",)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(down A [r, in(, k, k)], up B [out, r(, 1, 1)]) with B A the best rank-r approximation of
    ``delta`` (a Linear's [out, in] or a Conv2d's [out, in, k, k]) in float32 (Eckart-Young)."""
    matrix = delta.float().flatten(1)
    rank = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:rank].sqrt()
    up = u[:, :rank] * root
    down = root[:, None] * vh[:rank]
    if delta.ndim == 4:
        return down.reshape(rank, *delta.shape[1:]), up.reshape(delta.shape[0], rank, 1, 1)
    return down, up


def clamp_factors(down: torch.Tensor, up: torch.Tensor, quantile: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Both factors clipped to the ``quantile`` of their joint absolute values (kohya's
    ``--clamp_quantile``): a few outlying entries, which float16 stores badly, give way."""
    values = torch.cat([down.flatten(), up.flatten()]).abs()
    limit = torch.quantile(values, quantile).item()
    return down.clamp(-limit, limit), up.clamp(-limit, limit)


def extraction_layers(
    network: nn.Module, role: str, family: Family, convolutions: bool
) -> Iterator[tuple[str, nn.Linear | nn.Conv2d]]:
    """(path, layer) of each layer kohya's LoRA adapts in the network of ``role``."""
    targets = (
        ("text",) if role in family.text_roles else UNET_TARGETS + (CONV_TARGETS if convolutions else ())
    )
    seen = set()
    for target in targets:
        selections = TARGETS[target][1]
        for path, module in network.named_modules():
            for kind, children in selections:
                if not isinstance(module, kind):
                    continue
                for child in children:
                    layer = getattr(module, child, None)
                    full = f"{path}.{child}" if path else child
                    if isinstance(layer, nn.Linear | nn.Conv2d) and full not in seen:
                        seen.add(full)
                        yield full, layer


def layer_rank(layer: nn.Linear | nn.Conv2d, rank: int, conv_rank: int) -> int:
    """kohya's LoCon split: a convolution with a kernel larger than 1x1 takes ``conv_rank``."""
    spatial = isinstance(layer, nn.Conv2d) and layer.weight.shape[2:].numel() > 1
    return conv_rank if spatial else rank


@dataclass(frozen=True)
class Source:
    """A model to extract from: its config, its networks (real, or built on the meta device when the
    weights stay in the file) and ``weight(role, key)``, which gives one weight of one network."""

    name: str
    config: ModelConfig
    modules: Mapping[str, nn.Module]
    weight: Callable[[str, str], torch.Tensor]
    prediction_known: bool = True  # False: an SD 2 file whose eps/v only a forward pass would tell


def open_source(model: str | Path | Components) -> Source:
    """Components as they are; a single-file ``.safetensors`` streamed (its header read now, each weight
    when it is asked for); any other model ``ld.load`` reads (a folder, a pickle) loaded whole."""
    if isinstance(model, Components):
        return components_source(model)
    path = Path(model)
    if path.is_file() and file_kind(path) == "safetensors":
        return streamed_source(path)
    from latentdiffusion.pipelines.loading import load_components

    return components_source(load_components(str(model), dtype=torch.float32))


def components_source(components: Components) -> Source:
    modules = components.modules
    return Source(
        components.name,
        components.config,
        modules,
        lambda role, key: modules[role].get_parameter(key).detach(),
    )


def streamed_source(path: Path) -> Source:
    """A single file read as ``ld.load`` reads it (architecture from the header, its yaml or saved
    config; each network's layout), one tensor at a time (``safetensors_stream.read_tensor``)."""
    header = read_safetensors_header(path)
    shapes = meta_tensors(header)
    plan = read_plan(path, shapes)
    modules = check_shapes_first(plan.config, split_single_file(shapes, plan, str(path)), str(path))
    layouts = single_file_layouts(plan.config, plan.text_kind)

    def weight(role: str, key: str) -> torch.Tensor:
        stored = stored_key(layouts[role], key)
        return read_layout({stored: read_tensor(path, header, stored)}, layouts[role])[key]

    return Source(plan.config.name, plan.config, modules, weight, prediction_known=not plan.probe)


def stored_key(layout: Layout, key: str) -> str:
    """The file key that holds our ``key`` (for a part of a fused tensor, the fused tensor's key)."""
    for fused in layout.fused:
        for template in fused.ours:
            numbers = match_template(template, key)
            if numbers is not None:
                return layout.prefix + fused.theirs.format(*numbers)
    return layout.prefix + rename_key(key, layout.table)


@dataclass(frozen=True)
class LayerPlan:
    """A layer whose change goes into the file, with the rank of its factors (at most its matrix's)."""

    role: str
    path: str
    shape: tuple[int, ...]
    rank: int

    def specs(self, name: str, dtype: torch.dtype) -> list[TensorSpec]:
        """The layer's three entries under its kohya ``name`` (LoCon: a 1x1 ``lora_up`` for a conv)."""
        out, rest = self.shape[0], self.shape[1:]
        up = (out, self.rank, 1, 1) if len(self.shape) == 4 else (out, self.rank)
        return [
            TensorSpec(f"{name}.lora_down.weight", dtype, (self.rank, *rest)),
            TensorSpec(f"{name}.lora_up.weight", dtype, up),
            TensorSpec(f"{name}.alpha", dtype, ()),
        ]


def difference(tuned: Source, base: Source, role: str, path: str) -> torch.Tensor:
    """dW = W_tuned - W_base of one layer, in float32."""
    key = f"{path}.weight"
    return tuned.weight(role, key).float() - base.weight(role, key).float()


def changed_layers(
    tuned: Source,
    base: Source,
    family: Family,
    *,
    rank: int,
    conv_rank: int,
    min_difference: float,
    text_encoders: bool,
) -> list[LayerPlan]:
    """Every layer to extract (module doc), in network order; each pair of weights is read and dropped."""
    roles = [family.network_role, *(family.text_roles if text_encoders else ())]
    plans = []
    for role in roles:
        for path, layer in extraction_layers(tuned.modules[role], role, family, conv_rank > 0):
            if difference(tuned, base, role, path).abs().max() <= min_difference:
                continue
            shape = tuple(layer.weight.shape)
            wanted = layer_rank(layer, rank, conv_rank)
            plans.append(LayerPlan(role, path, shape, min(wanted, shape[0], math.prod(shape[1:]))))
    return plans


def layer_factors(
    tuned: Source, base: Source, plan: LayerPlan, clamp_quantile: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    down, up = low_rank_factors(difference(tuned, base, plan.role, plan.path), plan.rank)
    return (down, up) if clamp_quantile is None else clamp_factors(down, up, clamp_quantile)


def write_lora(
    output: Path,
    plans: list[LayerPlan],
    tuned: Source,
    base: Source,
    *,
    dtype: torch.dtype,
    clamp_quantile: float | None,
    metadata: Mapping[str, str],
    progress: bool = False,
) -> Path:
    """The kohya file, streamed: its header from ``plans``, then each layer's factors computed when the
    writer reaches them (a layer's down and up weights are adjacent, so one layer is held at a time);
    ``progress``: a bar over the layers on stderr."""
    from tqdm import tqdm

    family = family_of(tuned.config)
    named = {kohya_name(p.role, p.path, tuned.config.unet, prefixes=family.lora_prefixes): p for p in plans}
    specs = [spec for name, plan in named.items() for spec in plan.specs(name, dtype)]
    held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make(spec: TensorSpec) -> torch.Tensor:
        name, part = split_part(spec.name)
        plan = named[name]
        if part == "alpha":  # alpha = rank: scale 1
            return torch.tensor(float(plan.rank)).to(dtype)
        if name not in held:
            held.clear()
            held[name] = layer_factors(tuned, base, plan, clamp_quantile)
            bar.update()
        down, up = held[name]
        return (down if part.startswith("lora_down") else up).to(dtype)

    with tqdm(total=len(plans), desc="extract-lora", unit="layer", disable=not progress) as bar:
        write_streamed(output, specs, make, metadata)
    return output


def _check_pair(tuned: Source, base: Source) -> Family:
    family = family_of(tuned.config)
    if base.config.family != tuned.config.family:
        raise UserError(
            f"the tuned model is {tuned.config.family} and the base {base.config.family}; they must match"
        )
    if family.network_role != "unet":
        raise UserError(f"LoRA extraction supports U-Net models (SD 1.x/2.x, SDXL), not {family.description}")
    for role in family.roles:
        ours, theirs = tuned.modules.get(role), base.modules.get(role)
        if ours is None or theirs is None:
            continue
        shapes = {k: v.shape for k, v in ours.state_dict().items()}
        if shapes != {k: v.shape for k, v in theirs.state_dict().items()}:
            raise UserError(
                f"the tuned model's {role} and the base's differ in architecture; extract from its own base"
            )
    return family


def _checked_options(rank: int, conv_rank: int, clamp_quantile: float | None, dtype: str) -> None:
    if rank < 1 or conv_rank < 0:
        raise UserError(
            f"rank must be >= 1 and conv rank >= 0 (0: no convolution layers), got {rank} and {conv_rank}"
        )
    if clamp_quantile is not None and not 0 < clamp_quantile <= 1:
        raise UserError(f"clamp quantile must lie in (0, 1], got {clamp_quantile}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def extract_lora(
    tuned: str | Path | Components,
    base: str | Path | Components,
    *,
    rank: int = 16,
    output: str | Path,
    conv_rank: int | None = None,
    clamp_quantile: float | None = None,
    min_difference: float = 0.0,
    text_encoders: bool = True,
    dtype: str = "fp16",
    progress: bool = False,
) -> Path:
    """Write the LoRA that turns ``base`` into (nearly) ``tuned`` (module doc); models are paths or
    folders ``ld.load`` reads, or Components. ``progress``: a bar over the layers' SVDs on stderr.
    Returns the output path."""
    conv_rank = rank if conv_rank is None else conv_rank
    _checked_options(rank, conv_rank, clamp_quantile, dtype)
    tuned_source, base_source = open_source(tuned), open_source(base)
    family = _check_pair(tuned_source, base_source)
    plans = changed_layers(
        tuned_source,
        base_source,
        family,
        rank=rank,
        conv_rank=conv_rank,
        min_difference=min_difference,
        text_encoders=text_encoders,
    )
    if not plans:
        raise UserError(
            "the tuned model and the base have the same weights in every LoRA layer: nothing to extract"
        )
    metadata = kohya_metadata(
        tuned_source.config,
        rank,
        float(rank),
        conv_dim=conv_rank,
        extracted_from=_name(tuned),
        base=_name(base),
    )
    if not tuned_source.prediction_known:  # rather no entry than a guessed one
        del metadata["ss_v_parameterization"]
    return write_lora(
        Path(output),
        plans,
        tuned_source,
        base_source,
        dtype=DTYPES[dtype],
        clamp_quantile=clamp_quantile,
        metadata=metadata,
        progress=progress,
    )


def _name(model: str | Path | Components) -> str:
    return model.name if isinstance(model, Components) else Path(model).name
