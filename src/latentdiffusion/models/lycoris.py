"""LyCORIS adapters: the closed-form weight updates of LoCon, LoHa, LoKr, full-weight differences and
DoRA's weight decomposition, as merged into a frozen layer (Yeh et al. 2023, "Navigating Text-To-Image
Customization: From LyCORIS Fine-Tuning to Model Evaluation", ICLR 2024, Sec. 3).

Each adapter is the tensors a file stores for one layer; ``delta`` computes its update
Delta W = gamma * f(tensors) in float32, gamma = alpha / rank (Hu et al. 2022, Sec. 4.1), in the update's
own shape ([out, in * k * k] for the matrix forms, [out, in, k, k] for the Tucker forms), which the merge
reshapes to the layer's weight (only the element count and the output rows must agree):

- LoCon with a middle layer ("CP" / Tucker-2 decomposition of a k x k convolution, Yeh et al. Sec. 3.1):
  Delta W[o, i, :, :] = sum_ab up[o, a] mid[a, b, :, :] down[b, i]; plain LoCon (a k x k ``lora_down``,
  a 1x1 ``lora_up``) is ordinary LoRA (``checkpoints.lora_keys.LoRAWeights``).
- LoHa (Hadamard product, Yeh et al. Eq. 2, after Hyeon-Woo et al. 2022 "FedPara"):
  Delta W = (W1a W1b) * (W2a W2b), each factor optionally a Tucker core ``t`` with a and b.
- LoKr (Kronecker product, Yeh et al. Eq. 3): Delta W = W1 (x) W2, W1 and W2 each stored whole or as a
  low-rank pair (W2 also as a Tucker core); gamma = alpha / rank of the factored half, and 1 when both
  halves are stored whole (LyCORIS then trains no alpha).
- Full ("diff", Yeh et al.'s native fine-tuning as an adapter): Delta W = diff, Delta b = diff_b; gamma 1.
- DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", Eq. 5) on any of them:
  W' = m * (W + Delta W) / ||W + Delta W||, the norm taken per output row when the stored magnitude m
  (``dora_scale``) is [out, 1, ...] (LyCORIS's default) or per input column when it is [1, in, ...] (the
  paper's). A strength s interpolates the result, W + s * (W' - W), as the web UI and ComfyUI do; at
  s = 1 this is LyCORIS's own merge.

Tucker cores, whatever the adapter, follow LyCORIS's convention: core[a, b, ...] contracts its first
axis with the up (output) side and its second with the down (input) side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


def rebuild_tucker(core: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """Tucker-2 reconstruction W[o, i, ...] = sum_ab core[a, b, ...] up[a, o] down[b, i] (up: [r, out],
    down: [r, in]; Yeh et al. 2023, Sec. 3.1)."""
    return torch.einsum("ab...,ao,bi->oi...", core, up, down)


def _as_matrix(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.flatten(1) if tensor.ndim > 2 else tensor


def _scale(alpha: float | None, rank: int | None) -> float:
    """gamma = alpha / rank; 1 when the file stores no alpha (alpha = rank) or no rank applies."""
    return 1.0 if alpha is None or rank is None else alpha / rank


@dataclass(frozen=True)
class Adapter:
    """The tensors of one layer's adapter; every kind also has ``dora_scale`` (DoRA's magnitude, None
    when not trained) and, but for full differences, ``alpha``."""

    kind = "adapter"

    def delta(self, device: torch.device | str | None = None) -> torch.Tensor:
        """gamma * Delta W in float32, in the update's own shape."""
        raise NotImplementedError

    def bias_delta(self) -> torch.Tensor | None:
        """The update of the layer's bias (only full differences have one)."""
        return None

    @property
    def shape(self) -> torch.Size:
        """The update's shape, computed on the meta device; ValueError if the tensors do not fit together."""
        try:
            return self.delta("meta").shape
        except RuntimeError as error:
            raise ValueError(str(error).splitlines()[0]) from None


def _float(tensor: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device=device or tensor.device, dtype=torch.float32)


@dataclass(frozen=True)
class LoConTucker(Adapter):
    """LoCon of a k x k convolution as down [r, in, 1, 1], mid [r, r, k, k], up [out, r, 1, 1]."""

    down: torch.Tensor
    mid: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    kind = "LoCon (Tucker)"

    def delta(self, device=None) -> torch.Tensor:
        down, mid, up = (_float(t, device) for t in (self.down, self.mid, self.up))
        rank = down.shape[0]
        return rebuild_tucker(mid, _as_matrix(up).T, _as_matrix(down)) * _scale(self.alpha, rank)


@dataclass(frozen=True)
class LoHa(Adapter):
    """Delta W = (w1_a w1_b) * (w2_a w2_b) (Yeh et al. Eq. 2); with Tucker cores t1, t2 each factor is
    rebuild_tucker(t, w_a [r, out], w_b [r, in]). gamma = alpha / rank, rank = w1_b's rows."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    kind = "LoHa"

    def delta(self, device=None) -> torch.Tensor:
        first = _hadamard_factor(self.w1_a, self.w1_b, self.t1, device)
        second = _hadamard_factor(self.w2_a, self.w2_b, self.t2, device)
        if first.shape != second.shape:
            raise ValueError(f"the two Hadamard factors are {tuple(first.shape)} and {tuple(second.shape)}")
        return first * second * _scale(self.alpha, self.w1_b.shape[0])


def _hadamard_factor(a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None, device) -> torch.Tensor:
    a, b = _float(a, device), _float(b, device)
    if core is None:
        return _as_matrix(a) @ _as_matrix(b)
    return rebuild_tucker(_float(core, device), a, b)


@dataclass(frozen=True)
class LoKr(Adapter):
    """Delta W = W1 (x) W2 (Yeh et al. Eq. 3): W1 = w1 or w1_a w1_b ([a, b]); W2 = w2, w2_a w2_b, or
    rebuild_tucker(t2, w2_a [r, c], w2_b [r, d]) ([c, d(, k, k)]); the update is [a c, b d(, k, k)].

    gamma = alpha / rank with the rank of the factored half (w1_b's rows first, as LyCORIS and the web
    UI read it); 1 when both halves are whole.
    """

    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None
    dora_scale: torch.Tensor | None = None
    kind = "LoKr"

    @property
    def rank(self) -> int | None:
        factored = self.w1_b if self.w1_b is not None else self.w2_b
        return None if factored is None else factored.shape[0]

    def delta(self, device=None) -> torch.Tensor:
        w1 = _float(self.w1, device) if self.w1 is not None else self._product(self.w1_a, self.w1_b, device)
        if self.w2 is not None:
            w2 = _float(self.w2, device)
        elif self.t2 is not None:
            w2 = rebuild_tucker(_float(self.t2, device), _float(self.w2_a, device), _float(self.w2_b, device))
        else:
            w2 = self._product(self.w2_a, self.w2_b, device).reshape(-1, *self.w2_b.shape[1:])
        if w1.ndim != 2:
            raise ValueError(f"the first Kronecker factor must be a matrix, it is {tuple(w1.shape)}")
        w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - 2))
        return torch.kron(w1, w2.contiguous()) * _scale(self.alpha, self.rank)  # kron views its input

    @staticmethod
    def _product(a: torch.Tensor, b: torch.Tensor, device) -> torch.Tensor:
        return _as_matrix(_float(a, device)) @ _as_matrix(_float(b, device))


@dataclass(frozen=True)
class Full(Adapter):
    """A stored difference of the whole weight (``diff``) and of the bias (``diff_b``); gamma = 1."""

    diff: torch.Tensor
    diff_b: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None
    kind = "full"

    def delta(self, device=None) -> torch.Tensor:
        return _float(self.diff, device)

    def bias_delta(self) -> torch.Tensor | None:
        return _float(self.diff_b, None)


# ----------------------------------------------------------------------------------------- merging


def dora_rows(magnitude: torch.Tensor, shape: torch.Size) -> bool | None:
    """Whether DoRA's ``magnitude`` for a weight of ``shape`` keeps one number per output row ([out],
    [out, 1, ...]: True) or per input column ([1, in, ...]: False); None if it is neither."""
    if magnitude.shape[0] == shape[0] and magnitude.numel() == shape[0]:
        return True
    if magnitude.ndim >= 2 and magnitude.shape[:2] == (1, shape[1]) and magnitude.numel() == shape[1]:
        return False
    return None


def dora_weight(weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """m * (W + Delta W) / ||W + Delta W|| in float32 (Liu et al. 2024, Eq. 5), the norm over every axis
    but the one ``magnitude`` keeps (``dora_rows``), plus float32's epsilon as LyCORIS adds it."""
    merged = weight.float() + delta.float()
    kept = 0 if dora_rows(magnitude, merged.shape) else 1
    view = [1] * merged.ndim
    view[kept] = merged.shape[kept]
    norm = merged.transpose(0, kept).flatten(1).norm(dim=1).reshape(view)
    return (
        merged * magnitude.float().to(merged.device).reshape(view) / (norm + torch.finfo(torch.float32).eps)
    )


@torch.no_grad()
def merge_into(
    layer: nn.Linear | nn.Conv2d,
    delta: torch.Tensor,
    strength: float,
    magnitude: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """W <- W + strength * Delta W (reshaped to W), or with DoRA's ``magnitude``
    W <- W + strength * (dora_weight(W, Delta W, m) - W); b <- b + strength * ``bias``. In place."""
    weight = layer.weight
    delta = delta.to(weight.device).reshape(weight.shape)
    if magnitude is not None:
        delta = dora_weight(weight, delta, magnitude) - weight.float()
    weight.add_((delta * strength).to(weight.dtype))
    if bias is not None:
        layer.bias.add_((bias.to(layer.bias.device) * strength).to(layer.bias.dtype))
