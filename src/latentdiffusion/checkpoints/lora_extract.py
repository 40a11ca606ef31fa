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
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from latentdiffusion.checkpoints.lora_keys import kohya_metadata, save_lora
from latentdiffusion.components import Components
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


def extract_states(
    tuned: Components,
    base: Components,
    *,
    rank: int,
    conv_rank: int = 0,
    clamp_quantile: float | None = None,
    min_difference: float = 0.0,
    text_encoders: bool = True,
) -> dict[str, dict[str, torch.Tensor]]:
    """role -> our LoRA state dict (``{path}.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``)."""
    family = _check_pair(tuned, base)
    roles = [family.network_role, *(family.text_roles if text_encoders else ())]
    states: dict[str, dict[str, torch.Tensor]] = {}
    base_layers = {
        role: dict(extraction_layers(base.modules[role], role, family, conv_rank > 0)) for role in roles
    }
    for role in roles:
        for path, layer in extraction_layers(tuned.modules[role], role, family, conv_rank > 0):
            delta = layer.weight.detach().float() - base_layers[role][path].weight.detach().float()
            if delta.abs().max() <= min_difference:
                continue
            down, up = low_rank_factors(delta, layer_rank(layer, rank, conv_rank))
            if clamp_quantile is not None:
                down, up = clamp_factors(down, up, clamp_quantile)
            state = states.setdefault(role, {})
            state[f"{path}.lora_down.weight"] = down
            state[f"{path}.lora_up.weight"] = up
            state[f"{path}.alpha"] = torch.tensor(float(down.shape[0]))
    return states


def _check_pair(tuned: Components, base: Components) -> Family:
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
) -> Path:
    """Write the LoRA that turns ``base`` into (nearly) ``tuned`` (module doc); models are paths or
    folders ``ld.load`` reads, or Components. Returns the output path."""
    conv_rank = rank if conv_rank is None else conv_rank
    _checked_options(rank, conv_rank, clamp_quantile, dtype)
    tuned_model, base_model = _components(tuned), _components(base)
    states = extract_states(
        tuned_model,
        base_model,
        rank=rank,
        conv_rank=conv_rank,
        clamp_quantile=clamp_quantile,
        min_difference=min_difference,
        text_encoders=text_encoders,
    )
    if not states:
        raise UserError(
            "the tuned model and the base have the same weights in every LoRA layer: nothing to extract"
        )
    family = family_of(tuned_model.config)
    metadata = kohya_metadata(
        tuned_model.config,
        rank,
        float(rank),
        conv_dim=conv_rank,
        extracted_from=_name(tuned),
        base=_name(base),
    )
    return save_lora(
        output,
        states,
        tuned_model.config,
        metadata=metadata,
        dtype=DTYPES[dtype],
        prefixes=family.lora_prefixes,
    )


def _components(model: str | Path | Components) -> Components:
    if isinstance(model, Components):
        return model
    import latentdiffusion as ld

    return ld.load(str(model), dtype=torch.float32).components


def _name(model: str | Path | Components) -> str:
    return model.name if isinstance(model, Components) else Path(model).name
