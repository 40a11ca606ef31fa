"""Token merging for the U-Net's self-attention (ToMe for Stable Diffusion: Bolya & Hoffman 2023, "Token
Merging for Fast Stable Diffusion", on Bolya et al. 2023, "Token Merging: Your ViT But Faster").

At the finest attention level of an SD 1.x/2.x U-Net at 512 px, self-attention runs over 4096 tokens
and is about a third of the call's time on a CPU. Neighbouring tokens of a feature map are often
nearly equal, so the block merges the most redundant ones before self-attention and copies the result
back to them after it:

1. **Partition** (Sec. 4.1, "2D random stride"): the token grid is cut into ``stride`` cells (2x2);
   one token of each cell is a destination, the others are sources. Which one is a destination is
   drawn at random per U-Net call (top-left with ``random_destinations`` off); rows and columns that
   do not fill a whole cell are sources.
2. **Match** (bipartite soft matching, ToMe Sec. 3): every source picks its most similar destination
   by cosine similarity of the block's input tokens; the ``r`` sources with the highest similarity are
   merged, the rest stay.
3. **Merge**: each destination becomes the mean of itself and the sources merged into it; attention
   runs over the kept sources and the destinations, ``L - r`` tokens.
4. **Unmerge** (Sec. 3.2): every merged source takes its destination's output.

``r = int(L * ratio)``, at most the number of sources (3/4 of the tokens with a 2x2 stride). Only
self-attention is merged (the paper's recommended setting); cross-attention and the feed-forward see
every token. The merged tokens' outputs are shared, so images change a little: merging trades
quality for speed (measured in docs/benchmarks.md).

A U-Net call opts in with ``merging_tokens(settings, latent_size, timestep)``; the transformer blocks
read the active settings (a context variable, so concurrent calls in other threads are unaffected) and
ask :func:`plan_for` for their tokens. The random partition is drawn from the call's timestep, so the
conditional and unconditional passes of one step share it whether or not they are batched together, and
the same request gives the same images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from latentdiffusion.errors import UserError

MAX_RATIO = 0.75  # with a 2x2 stride, three tokens in four are sources: at most that many can merge
PARTITION_SEED = 0x70E  # the partition generator's seed is this plus the call's timestep (x1000)


@dataclass(frozen=True)
class TokenMerging:
    """How a U-Net call merges tokens: ``ratio`` of each merged level's tokens removed before
    self-attention, at the levels downsampled at most ``max_downsample`` times from the latent (1: the
    full-resolution level only)."""

    ratio: float
    max_downsample: int = 1
    stride: tuple[int, int] = (2, 2)  # (rows, columns) of a partition cell
    random_destinations: bool = True

    def __post_init__(self) -> None:
        validate_ratio(self.ratio)


def validate_ratio(ratio: object) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= MAX_RATIO:
        raise UserError(f"the token merging ratio must be a number in [0, {MAX_RATIO}], got {ratio!r}")


@dataclass(frozen=True)
class _Active:
    settings: TokenMerging
    height: int  # the latent's token grid (the U-Net's full resolution)
    width: int
    seed: int


_ACTIVE: ContextVar[_Active | None] = ContextVar("token_merging", default=None)


@contextmanager
def merging_tokens(settings: TokenMerging, latent_size: tuple[int, int], timestep: float) -> Iterator[None]:
    """Merge tokens in the transformer blocks that run inside this context (one U-Net call on a latent
    of ``latent_size``, at ``timestep``)."""
    seed = PARTITION_SEED + round(float(timestep) * 1000)
    token = _ACTIVE.set(_Active(settings, *latent_size, seed))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    """True inside ``merging_tokens`` (backends that cannot merge refuse or fall back)."""
    return _ACTIVE.get() is not None


def plan_for(x: torch.Tensor) -> MergePlan | None:
    """The merge plan for a transformer block's input tokens ``x`` [B, L, C], or None where nothing is
    merged (no active settings, a level below ``max_downsample``, or no token to remove)."""
    state = _ACTIVE.get()
    if state is None:
        return None
    settings, tokens = state.settings, x.shape[1]
    downsample = math.ceil(math.sqrt(state.height * state.width / tokens))
    height, width = math.ceil(state.height / downsample), math.ceil(state.width / downsample)
    if downsample > settings.max_downsample or height * width != tokens:
        return None
    remove = int(tokens * settings.ratio)
    if remove <= 0:
        return None
    generator = torch.Generator().manual_seed(state.seed) if settings.random_destinations else None
    return MergePlan(x, height, width, settings.stride, remove, generator)


def destination_mask(
    height: int, width: int, stride: tuple[int, int], generator: torch.Generator | None
) -> torch.Tensor:
    """[height * width] bool, True at each cell's destination token (row-major grid)."""
    rows, cols = stride
    cells_y, cells_x = height // rows, width // cols
    if generator is None:
        pick = torch.zeros(cells_y, cells_x, dtype=torch.long)
    else:
        pick = torch.randint(rows * cols, (cells_y, cells_x), generator=generator)
    cell_y = torch.arange(cells_y)[:, None] * rows + pick // cols
    cell_x = torch.arange(cells_x)[None, :] * cols + pick % cols
    mask = torch.zeros(height, width, dtype=torch.bool)
    mask[cell_y, cell_x] = True
    return mask.flatten()


class MergePlan:
    """Which tokens of a [B, L, C] batch merge into which (computed once per block from its input)."""

    def __init__(
        self,
        metric: torch.Tensor,
        height: int,
        width: int,
        stride: tuple[int, int],
        remove: int,
        generator: torch.Generator | None,
    ) -> None:
        is_destination = destination_mask(height, width, stride, generator).to(metric.device)
        self.destinations = is_destination.nonzero().squeeze(1)  # [D] token positions
        sources = (~is_destination).nonzero().squeeze(1)  # [S]
        self.tokens = metric.shape[1]
        remove = min(remove, sources.numel())
        with torch.no_grad():
            unit = metric / metric.norm(dim=-1, keepdim=True)
            similarity = unit[:, sources] @ unit[:, self.destinations].transpose(1, 2)  # [B, S, D]
            best, partner = similarity.max(dim=-1)  # each source's most similar destination
            order = best.argsort(dim=-1, descending=True, stable=True)  # [B, S]
        merged = order[:, :remove]  # indices into sources
        self.kept = sources[order[:, remove:]]  # [B, S - r] token positions that stay
        self.merged = sources[merged]  # [B, r] token positions merged away
        self.into = partner.gather(1, merged)  # [B, r] index of each merged token's destination

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [B, L - r, C]: the kept sources, then the destinations averaged with their
        merged sources."""
        channels = x.shape[-1]
        kept = _take(x, self.kept)
        destinations = x[:, self.destinations]
        sources = _take(x, self.merged)
        index = self.into[..., None].expand(-1, -1, channels)
        destinations = destinations.scatter_reduce(1, index, sources, reduce="mean", include_self=True)
        return torch.cat([kept, destinations], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, L - r, C] -> [B, L, C]: each token gets its own output, a merged one its destination's."""
        batch, channels = y.shape[0], y.shape[-1]
        kept, destinations = y[:, : self.kept.shape[1]], y[:, self.kept.shape[1] :]
        out = y.new_empty(batch, self.tokens, channels)
        out[:, self.destinations] = destinations
        out.scatter_(1, self.kept[..., None].expand(-1, -1, channels), kept)
        merged = _take(destinations, self.into)
        out.scatter_(1, self.merged[..., None].expand(-1, -1, channels), merged)
        return out


def _take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, L, C] at per-item token positions index [B, K] -> [B, K, C]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))
