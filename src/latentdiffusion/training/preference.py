"""Diffusion-DPO (Wallace et al. 2024, "Diffusion Model Alignment Using Direct Preference Optimization",
Eq. 14): fine-tune a model on pairs of images of one prompt, one preferred to the other, so that it
denoises the preferred image better, and the other worse, than the model it started from does.

Per pair (x_w preferred, x_l not, prompt c), one timestep t and one noise eps shared by both images:

    d(x) = || target(z0(x), eps, t) - net(z_t(x), t, c) ||^2 - || target - ref(z_t(x), t, c) ||^2
    L    = -log sigmoid( -beta / 2 * (d(x_w) - d(x_l)) )

in the network's own output space (eps, v or flow velocity), with mean squared errors over the latent's
elements (so ``beta`` is the paper's beta T per element: 5000 for its SD 1.5 run). The loss can lower
the margin by denoising the other image worse as well as the preferred one better; ``sft`` > 0 adds
``sft`` times the plain denoising error of the preferred image, so that the model keeps denoising it well
(as RPO, Pang et al. 2024, adds the preferred answer's likelihood to DPO). ``ref`` is the model as
loaded, frozen: a copy of the network, or for LoRA runs the same network with its adapters off. At the
first step the two agree and L = log 2; the logged ``accuracy`` is the share of pairs whose preferred
image the model already favours more than the reference does.

The pairs are a folder holding ``pairs.jsonl``, one JSON object per line: ``{"prompt": ..., "chosen":
PATH, "rejected": PATH}`` with image paths relative to the folder (as Pick-a-Pic's caption / preferred /
other columns). ``ldm shapes-pairs`` makes such a folder from a model's own images judged by the shapes
world's strict checker. The run is ``ldm finetune --dpo DIR`` (``training.finetune``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.models.lora import frozen_original, original_network
from latentdiffusion.training.config import DataConfig, TrainConfig
from latentdiffusion.training.data import Batch, DataSplit, prepared_image
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.task import StepRandom

PAIRS_FILE = "pairs.jsonl"
MAX_PAIRS_FILE_BYTES = 256 * 2**20  # a pairs file is text: one short line per pair
DEFAULT_BETA = 5000.0
# the fine-tuning settings a DPO run starts from (``ldm finetune --dpo``): plain squared errors (no min-SNR
# weights, which the paper's loss does not have) and every prompt kept (the preference is the prompt's)
PREFERENCE_DEFAULTS: dict[str, Any] = {"diffusion.min_snr_gamma": None, "data.caption_dropout": 0.0}


@dataclass(frozen=True)
class PreferenceOptions:
    """The folder of pairs, the strength beta of the KL bound to the starting model, and the weight of a
    plain denoising loss on the preferred images added to the DPO loss (``sft``; 0: none)."""

    pairs: str
    beta: float = DEFAULT_BETA
    sft: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.beta, int | float) and math.isfinite(self.beta) and self.beta > 0):
            raise UserError(f"the DPO beta must be a number > 0, got {self.beta!r}")
        if not (isinstance(self.sft, int | float) and math.isfinite(self.sft) and self.sft >= 0):
            raise UserError(f"the DPO SFT weight must be a number >= 0, got {self.sft!r}")


@dataclass(frozen=True)
class Pair:
    prompt: str
    chosen: Path
    rejected: Path


def read_pairs(folder: str | Path) -> list[Pair]:
    """The pairs of ``folder/pairs.jsonl``, every image checked to exist; one clear error otherwise."""
    root = Path(folder)
    path = root / PAIRS_FILE
    if not path.is_file():
        raise UserError(f"{root} holds no {PAIRS_FILE} (one JSON object per line: prompt, chosen, rejected)")
    if path.stat().st_size > MAX_PAIRS_FILE_BYTES:
        raise UserError(f"{path} is larger than {MAX_PAIRS_FILE_BYTES >> 20} MiB: not a pairs file")
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            pairs.append(parse_pair(line, root, f"{path}, line {number}"))
    if not pairs:
        raise UserError(f"{path} holds no pairs")
    return pairs


def parse_pair(line: str, root: Path, where: str) -> Pair:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: not JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected an object with prompt, chosen and rejected")
    values = {key: record.get(key) for key in ("prompt", "chosen", "rejected")}
    wrong = [key for key, value in values.items() if not isinstance(value, str)]
    if wrong:
        raise UserError(f"{where}: {wrong[0]} must be a string")
    images = {}
    for key in ("chosen", "rejected"):
        image = (root / values[key]).resolve()
        if not image.is_relative_to(root.resolve()):
            raise UserError(f"{where}: {key} image {values[key]!r} lies outside {root}")
        if not image.is_file():
            raise UserError(f"{where}: {key} image {values[key]!r} does not exist")
        images[key] = image
    return Pair(values["prompt"], images["chosen"], images["rejected"])


class PreferenceSource:
    """Item ``i``: pair ``i``'s preferred and other image, prepared (shorter side to ``resolution``, centre
    crop) and stacked on channels ([6, H, W] in [-1, 1]), with its prompt."""

    def __init__(self, pairs: list[Pair], resolution: int, center_crop: bool = True) -> None:
        self.pairs, self.resolution, self.center_crop = pairs, resolution, center_crop
        self.size = len(pairs)

    def image(self, path: Path) -> torch.Tensor:
        return prepared_image(path, self.resolution, self.center_crop)

    def load(self, index: int) -> tuple[torch.Tensor, str]:
        pair = self.pairs[index]
        return torch.cat([self.image(pair.chosen), self.image(pair.rejected)]), pair.prompt


def dpo_loss(
    policy_errors: torch.Tensor, reference_errors: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair [n]: the loss -log sigmoid(-beta / 2 * (d_w - d_l)) and its argument, from the errors
    [2n] (the n preferred items, then the n others) of the model and of the reference."""
    preferred, other = (policy_errors - reference_errors).chunk(2)
    margin = -0.5 * beta * (preferred - other)
    return -F.logsigmoid(margin), margin


class PreferenceTask(DiffusionTask):
    """The Diffusion-DPO objective on the loop's batches of pairs."""

    name = "dpo"
    uses_denoising_loss = False

    def __init__(
        self, config: TrainConfig, components: Components, device: torch.device, options: PreferenceOptions
    ) -> None:
        super().__init__(config, components, device)
        if config.diffusion.train_text_encoder:
            raise UserError("DPO keeps the text encoder frozen: drop diffusion.train_text_encoder")
        if config.diffusion.min_snr_gamma is not None or config.diffusion.offset_noise:
            raise UserError(
                "DPO compares plain denoising errors: drop diffusion.min_snr_gamma and offset_noise"
            )
        self.options = options
        # a full run keeps a frozen copy of the starting network; a LoRA run has it with the adapters off
        self.reference = frozen_original(self.network)

    def open_data(self, config: DataConfig, seed: int) -> DataSplit:
        """The pairs, no held-out items (so no held-out loss either)."""
        source = PreferenceSource(read_pairs(self.options.pairs), config.resolution, config.center_crop)
        return DataSplit(source, np.arange(source.size), None, np.arange(0))

    def losses(
        self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        loss, margin = self.pair_losses(modules[self.network_role], batch, random)
        loss = loss.mean()
        return {"model": loss}, {"loss": loss.item(), "accuracy": (margin > 0).float().mean().item()}

    def pair_losses(
        self, network: nn.Module, batch: Batch, random: StepRandom
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per pair [n]: the loss (``dpo_loss`` plus ``sft`` times the preferred image's error) and the
        DPO margin."""
        policy, reference = self.pair_errors(network, batch, random)
        loss, margin = dpo_loss(policy, reference, self.options.beta)
        return loss + self.options.sft * policy[: len(loss)], margin

    def pair_errors(
        self, network: nn.Module, batch: Batch, random: StepRandom
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The denoising errors [2n] (the preferred images, then the others) of ``network`` and of the
        reference, both images of a pair noised with the same noise and time."""
        z0 = torch.cat([self.latents(replace(batch, x=x), random) for x in batch.x.chunk(2, dim=1)])
        t = self.timesteps(random).repeat(2)
        eps = random.randn(*z0.shape[1:], device=self.device).repeat(2, 1, 1, 1)
        z_t = self.process.add_noise(z0, eps, t)
        target = self.process.training_target(self.config.model.schedule.prediction_type, z0, eps, t).float()
        cond = self.condition(self.networks, doubled(batch))
        timestep = self.process.network_timestep(t)

        def errors(net: nn.Module) -> torch.Tensor:
            return (net(z_t, timestep, **cond).float() - target).pow(2).mean(dim=(1, 2, 3))

        with torch.no_grad(), original_network(self.network, self.reference) as reference:
            frozen = errors(reference)
        return errors(network), frozen


def doubled(batch: Batch) -> Batch:
    """The batch's captions and geometry repeated, for its preferred items followed by the others."""
    return replace(batch, captions=[*batch.captions] * 2, geometry=[*batch.geometry] * 2)
