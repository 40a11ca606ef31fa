"""Exponential moving average of weights (Polyak & Juditsky 1992), as diffusion models are sampled from.

theta_ema <- d_t * theta_ema + (1 - d_t) * theta with d_t = min(decay, (1 + t) / (10 + t)), the warm-up of
TensorFlow's ExponentialMovingAverage(num_updates=t): early averages do not drag the random init along.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def ema_decay(decay: float, step: int) -> float:
    """d_t = min(decay, (1 + t) / (10 + t)) for update number t (0-based)."""
    return min(decay, (1.0 + step) / (10.0 + step))


class EMA:
    """Shadow copies (float32) of a list of parameters, typically the trainable ones of one network."""

    def __init__(self, parameters: Sequence[torch.Tensor], decay: float) -> None:
        self.decay = decay
        self.updates = 0
        self.shadow = [p.detach().clone().float() for p in parameters]

    @torch.no_grad()
    def update(self, parameters: Sequence[torch.Tensor]) -> None:
        d = ema_decay(self.decay, self.updates)
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in parameters], 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, parameters: Sequence[torch.Tensor]) -> None:
        """Write the averages into ``parameters`` (cast to their dtypes)."""
        for p, s in zip(parameters, self.shadow, strict=True):
            p.copy_(s)

    @contextmanager
    def applied(self, parameters: Sequence[torch.Tensor]) -> Iterator[None]:
        """Temporarily swap the averages in (for evaluation and export), restoring the weights after."""
        backup = [p.detach().clone() for p in parameters]
        self.copy_to(parameters)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, b in zip(parameters, backup, strict=True):
                    p.copy_(b)

    def state_dict(self) -> dict[str, object]:
        return {"decay": self.decay, "updates": self.updates, "shadow": list(self.shadow)}

    def load_state_dict(self, state: dict[str, object]) -> None:
        shadow = state["shadow"]
        if not isinstance(shadow, list) or len(shadow) != len(self.shadow):
            raise ValueError("the EMA state does not fit the model's trainable parameters")
        self.decay = float(state["decay"])  # type: ignore[arg-type]
        self.updates = int(state["updates"])  # type: ignore[call-overload]
        self.shadow = [s.clone().float() for s in shadow]
