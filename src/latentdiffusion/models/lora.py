"""LoRA: low-rank adaptation of frozen layers (Hu et al. 2022, "LoRA: Low-Rank Adaptation of Large
Language Models", Sec. 4.1, Eq. 3).

A frozen weight W (a Linear [out, in] or a Conv2d [out, in, k, k]) is adapted by a product of two small
matrices, h = W x + (alpha / r) * B A x, with A = ``lora_down`` (r rows; a Conv2d with W's kernel, stride
and padding for convolutions) and B = ``lora_up`` (a Linear or 1x1 Conv2d from r). B starts at zero, so
training starts from the pretrained function; only A and B are trained. ``merge`` folds
(alpha / r) * B A into W for inference at no extra cost, ``unmerge`` takes it out again.

The names ``lora_down`` / ``lora_up`` / ``alpha`` are those of the kohya / A1111 LoRA files
(``checkpoints.lora_keys`` reads and writes them), so a wrapper's state dict is one file entry away.
Target modules are chosen by name from ``TARGETS``: each target is a set of child layers of one module
type in one network.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from latentdiffusion.errors import UserError
from latentdiffusion.models.attention import Attention, FeedForward, SpatialTransformer
from latentdiffusion.models.layers import Downsample, ResBlock, Upsample
from latentdiffusion.models.mmdit import Mlp, StreamAttention
from latentdiffusion.models.text_encoder import MLP, SelfAttention

Adaptable = nn.Linear | nn.Conv2d
# target name -> (network, ((module type, child layer names), ...)); "unet" stands for the denoising
# network (``inject_lora``'s ``roles`` maps it to another role, such as SD3's "transformer"), whose
# attention and feed-forward layers are those of the U-Net's transformer blocks or of the MMDiT's streams
TARGETS: dict[str, tuple[str, tuple[tuple[type[nn.Module], tuple[str, ...]], ...]]] = {
    "attention": (
        "unet",
        (
            (Attention, ("to_q", "to_k", "to_v", "to_out")),
            (StreamAttention, ("to_q", "to_k", "to_v", "to_out")),
        ),
    ),
    "ff": ("unet", ((FeedForward, ("proj_in", "proj_out")), (Mlp, ("fc1", "fc2")))),
    "proj": ("unet", ((SpatialTransformer, ("proj_in", "proj_out")),)),
    "resnets": (
        "unet",
        (
            (ResBlock, ("conv1", "conv2", "conv_shortcut", "time_emb_proj")),
            (Downsample, ("conv",)),
            (Upsample, ("conv",)),
        ),
    ),
    "text": (
        "text_encoder",
        ((SelfAttention, ("q_proj", "k_proj", "v_proj", "out_proj")), (MLP, ("fc1", "fc2"))),
    ),
}
DEFAULT_TARGETS = ("attention",)


class LoRA(nn.Module):
    """A frozen ``base`` layer plus the low-rank update (alpha / rank) * strength * up(down(x))."""

    def __init__(
        self, base: Adaptable, rank: int, alpha: float | None = None, *, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if rank < 1:
            raise UserError(f"LoRA rank must be >= 1, got {rank}")
        if isinstance(base, nn.Conv2d) and base.groups != 1:
            raise UserError("LoRA supports only ungrouped convolutions")
        self.base = base
        self.rank = rank
        self.strength = 1.0
        self.merged = False
        self.dropout = nn.Dropout(dropout)
        self.lora_down, self.lora_up = _low_rank_pair(base, rank)
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_down.to(**factory)
        self.lora_up.to(**factory)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # nn.Linear's own default init
        nn.init.zeros_(self.lora_up.weight)  # B = 0: the adapted layer starts as the pretrained one
        self.register_buffer("alpha", torch.tensor(float(rank if alpha is None else alpha)))

    @property
    def scale(self) -> float:
        """alpha / rank * strength (Hu et al. 2022, Sec. 4.1: alpha decouples the step size from r)."""
        return float(self.alpha) / self.rank * self.strength

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_up(self.lora_down(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """scale * B A in the base weight's shape, computed in float32."""
        return low_rank_delta(self.lora_down.weight, self.lora_up.weight, self.base.weight.shape) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scale * B A; the forward pass then costs what the base layer costs."""
        if not self.merged:
            add_to_weight(self.base, self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scale * B A (the weights before ``merge``, up to rounding)."""
        if self.merged:
            add_to_weight(self.base, -self.delta_weight())
            self.merged = False


def _low_rank_pair(base: Adaptable, rank: int) -> tuple[nn.Module, nn.Module]:
    if isinstance(base, nn.Conv2d):
        down = nn.Conv2d(
            base.in_channels,
            rank,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
        )
        return down, nn.Conv2d(rank, base.out_channels, 1, bias=False)
    return nn.Linear(base.in_features, rank, bias=False), nn.Linear(rank, base.out_features, bias=False)


def low_rank_delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """B A as a weight of ``shape`` (float32): [out, r] @ [r, in * k * k], reshaped.

    A 1x1-conv pair fits a Linear and a Linear pair fits a 1x1 conv: only the element count matters.
    """
    delta = up.flatten(1).float() @ down.flatten(1).float()
    return delta.reshape(shape)


def add_to_weight(layer: Adaptable, delta: torch.Tensor) -> None:
    """In-place ``layer.weight += delta`` (cast to the weight's dtype and device); an in-place update, so
    caches keyed on the weight's version (pre-packed CPU weights) see the change."""
    with torch.no_grad():
        layer.weight.add_(delta.to(device=layer.weight.device, dtype=layer.weight.dtype))


# ------------------------------------------------------------------------------------ injection


def inject_lora(
    networks: Mapping[str, nn.Module],
    targets: Sequence[str] = DEFAULT_TARGETS,
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    roles: Mapping[str, Sequence[str]] | None = None,
    exclude: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """Wrap every layer that ``targets`` (names of ``TARGETS``) select in a ``LoRA``, in place.

    ``networks`` maps roles ("unet", "text_encoder", ...) to the modules. ``roles`` maps the network a
    target names to the roles it adapts (default: the role of that name; SDXL's "text_encoder" ->
    both text encoders); ``exclude`` lists, per role, module paths whose layers get no adapter. Returns
    role -> wrapped module paths.
    """
    targets = _checked_targets(targets)
    idle = [
        t for t in targets if not any(_selected_layers(networks[r], TARGETS[t][1]) for r in _roles(t, roles))
    ]
    if idle:  # e.g. "resnets" on SD3's transformer, which has no convolution blocks
        raise UserError(
            f"LoRA targets {', '.join(idle)} select no layer of this model ({', '.join(networks)}); "
            "choose other targets"
        )
    wrapped: dict[str, list[str]] = {}
    for target in targets:
        selections = TARGETS[target][1]
        for role in _roles(target, roles):
            skipped = tuple((exclude or {}).get(role, ()))
            for path, parent, child in _selected_layers(networks[role], selections):
                if any(path == p or path.startswith(p + ".") for p in skipped):
                    continue
                setattr(parent, child, LoRA(getattr(parent, child), rank, alpha, dropout=dropout))
                wrapped.setdefault(role, []).append(path)
    return wrapped


def _roles(target: str, roles: Mapping[str, Sequence[str]] | None) -> Sequence[str]:
    """The roles a target adapts: ``roles`` maps the network it names to them (default: that role)."""
    network = TARGETS[target][0]
    return (roles or {}).get(network, (network,))


def _checked_targets(targets: Sequence[str]) -> list[str]:
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise UserError(f"unknown LoRA targets {unknown or '(none given)'}; choose from {', '.join(TARGETS)}")
    return list(dict.fromkeys(targets))


def _selected_layers(
    network: nn.Module, selections: Iterable[tuple[type[nn.Module], tuple[str, ...]]]
) -> list[tuple[str, nn.Module, str]]:
    """(path, parent, child name) of each not yet wrapped Linear / Conv2d child that a selection names."""
    found = []
    for path, module in network.named_modules():
        for kind, children in selections:
            if not isinstance(module, kind):
                continue
            for child in children:
                layer = getattr(module, child, None)
                if isinstance(layer, Adaptable):
                    found.append((f"{path}.{child}" if path else child, module, child))
    return found


def lora_modules(network: nn.Module) -> dict[str, LoRA]:
    """Module path -> LoRA wrapper, in ``named_modules`` order."""
    return {path: m for path, m in network.named_modules() if isinstance(m, LoRA)}


def lora_parameters(network: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA weights (A and B of every wrapper)."""
    return [p for m in lora_modules(network).values() for p in (m.lora_down.weight, m.lora_up.weight)]


def lora_state_dict(network: nn.Module) -> dict[str, torch.Tensor]:
    """``{path}.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` of every wrapper (detached)."""
    state = {}
    for path, m in lora_modules(network).items():
        state[f"{path}.lora_down.weight"] = m.lora_down.weight.detach()
        state[f"{path}.lora_up.weight"] = m.lora_up.weight.detach()
        state[f"{path}.alpha"] = m.alpha.detach()
    return state


def set_lora_strength(network: nn.Module, strength: float) -> None:
    """Scale every unmerged wrapper's update by ``strength`` (merged ones: unmerge first)."""
    for m in lora_modules(network).values():
        if m.merged:
            raise ValueError("unmerge the LoRA weights before changing their strength")
        m.strength = strength


def frozen_original(network: nn.Module) -> nn.Module | None:
    """A frozen copy of ``network`` as it starts training, or None where it has LoRA adapters: switched
    off, they leave the original (``original_network``)."""
    return None if lora_modules(network) else copy.deepcopy(network).eval().requires_grad_(False)


@contextmanager
def original_network(network: nn.Module, frozen: nn.Module | None) -> Iterator[nn.Module]:
    """The network before training (a teacher, a reference): ``frozen`` (``frozen_original``), else
    ``network`` itself with its adapters switched off for the block."""
    if frozen is not None:
        yield frozen
        return
    set_lora_strength(network, 0.0)
    try:
        yield network
    finally:
        set_lora_strength(network, 1.0)


def merge_lora(network: nn.Module) -> None:
    for m in lora_modules(network).values():
        m.merge()


def unmerge_lora(network: nn.Module) -> None:
    for m in lora_modules(network).values():
        m.unmerge()


def remove_lora(network: nn.Module, *, merge: bool = True) -> None:
    """Put every base layer back in its wrapper's place, with the update merged in (or dropped)."""
    for path, m in list(lora_modules(network).items()):
        if merge:
            m.merge()
        elif m.merged:
            m.unmerge()
        parent, _, child = path.rpartition(".")
        setattr(network.get_submodule(parent) if parent else network, child, m.base)


def adaptable_layers(network: nn.Module) -> dict[str, Adaptable]:
    """Module path -> Linear / Conv2d layer a LoRA file may adapt; a wrapper stands for its base layer
    (its own low-rank layers are not adaptable)."""
    layers: dict[str, Adaptable] = {}
    inside: list[str] = []
    for path, module in network.named_modules():
        if any(path.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, LoRA):
            layers[path] = module.base
            inside.append(path + ".")
        elif isinstance(module, Adaptable):
            layers[path] = module
    return layers
