"""Textual inversion (Gal et al. 2022, "An Image is Worth One Word", Sec. 4): learn the input vectors of
one new prompt word for a frozen model from a handful of images.

    v* = argmin_v E_{z0, y, eps, t} || target - net(z_t, t, tau(y with the word -> v)) ||^2   (Eq. 2)

The word's N vectors (per text encoder of the family) start as the token embedding of an initial word
(Sec. 4.1) and are the only parameters; the denoising network, the autoencoder and the text encoders stay
frozen. The objective is the model's own denoising loss (``training.diffusion``); the captions carry the
word, which the role's tokenizer turns into placeholder ids (``embeddings.TokenizerWithEmbeddings``) and
the text encoder reads from the trained table (``TextEncoder(..., extra_vectors=)``). Captions come from
same-stem ``.txt`` files (``{token}`` replaced by the word; a caption without the word gets it in front),
or, without them, from the templates below. The loop is the project's (checkpoints, exact resume, DDP);
the export is the web UI's ``.safetensors`` (``emb_params``; SDXL: ``clip_l``/``clip_g``), which
``pipe.load_embedding`` and ``--embeddings-dir`` read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.config import ModelConfig
from latentdiffusion.embeddings import (
    Embedding,
    TokenizerWithEmbeddings,
    check_name,
    embedding_roles,
    save_embedding,
)
from latentdiffusion.errors import UserError
from latentdiffusion.families.base import Cond
from latentdiffusion.models.tokenizer import CLIPTokenizer
from latentdiffusion.training import checkpointing
from latentdiffusion.training.config import (
    DataConfig,
    DiffusionLossConfig,
    OptimConfig,
    SampleConfig,
    TrainConfig,
)
from latentdiffusion.training.data import CAPTION_SUFFIX, IMAGE_SUFFIXES, DataSplit, open_image, read_caption
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.distributed import Distributed
from latentdiffusion.training.finetune import frozen_model_config

OPTIONS_FILE = "embedding.json"
TEMPLATES = (  # the web UI's subject templates, for images without captions
    "a photo of a {token}",
    "a rendering of a {token}",
    "a close-up photo of the {token}",
    "a bright photo of the {token}",
    "a cropped photo of a {token}",
    "a good photo of a {token}",
    "a photo of one {token}",
    "a rendition of the {token}",
)

EMBEDDING_DEFAULTS: dict[str, Any] = {
    "data": DataConfig(dataset="imagefolder", holdout=0, caption_dropout=0.0),
    # The plain, unweighted denoising loss of the original method (Gal et al. 2022): with Min-SNR
    # weighting a v-prediction model's loss weight SNR / (SNR + 1) all but vanishes at high noise, where a
    # word's colour and layout are decided. When this default was chosen (commit 6a1adee), the shapes
    # world's colour word retrained without it went from 75.0% to 80.0% of its 60 held-out scenes.
    "diffusion": DiffusionLossConfig(train_text_encoder=False, min_snr_gamma=None),
    "optim": OptimConfig(lr=5e-3, weight_decay=0.0, warmup_steps=20),
    "sample": SampleConfig(prompts=()),
    "batch_size": 4,
    "max_steps": 500,
    "ema_decay": 0.0,
    "checkpoint_every": 100,
}


@dataclass(frozen=True)
class EmbeddingOptions:
    """The word to learn, the word its vectors start from, and how many vectors it gets."""

    token: str
    init_word: str
    vectors: int = 1

    def validate(self) -> None:
        check_name(self.token)
        if not 1 <= self.vectors <= 75:
            raise UserError(f"--vectors must be in 1..75, got {self.vectors}")
        if not self.init_word.strip():
            raise UserError("the initial word must be non-empty text")


# ---------------------------------------------------------------------------------------------- data


class EmbeddingImages:
    """The training images of a folder, captioned by same-stem ``.txt`` files or by ``TEMPLATES``."""

    def __init__(self, root: str | Path, token: str) -> None:
        self.root, self.token = Path(root), token
        if not self.root.is_dir():
            raise UserError(f"image folder {self.root} does not exist or is not a folder")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise UserError(f"image folder {self.root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        self.size = len(self.files)

    def load(self, index: int) -> tuple[Image.Image, str]:
        path = self.files[index]
        text_file = path.with_suffix(CAPTION_SUFFIX)
        caption = read_caption(text_file) if text_file.is_file() else TEMPLATES[index % len(TEMPLATES)]
        return open_image(path), with_token(caption, self.token)


def with_token(caption: str, token: str) -> str:
    """``caption`` naming ``token``: ``{token}`` replaced; a caption without the word gets it in front."""
    caption = caption.replace("{token}", token)
    return caption if token.lower() in caption.lower() else f"{token}, {caption}"


# -------------------------------------------------------------------------------------------- vectors


class EmbeddingVectors(nn.Module):
    """The trained vectors, one [N, D] parameter per text encoder; ``forward`` returns them (so that a
    DDP wrapper sees the use that produces their gradients)."""

    def __init__(self, initial: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.vectors = nn.ParameterDict({role: nn.Parameter(v.clone()) for role, v in initial.items()})

    def forward(self) -> dict[str, torch.Tensor]:
        return dict(self.vectors.items())


class WithExtraVectors(nn.Module):
    """A text encoder called with the trained table, for the family's training condition."""

    def __init__(self, encoder: nn.Module, vectors: torch.Tensor) -> None:
        super().__init__()
        self.encoder, self.vectors = encoder, vectors

    def forward(self, input_ids: torch.Tensor, pooled: bool = False) -> Any:
        return self.encoder(input_ids, pooled, extra_vectors=self.vectors)


def initial_vectors(components: Components, options: EmbeddingOptions) -> dict[str, torch.Tensor]:
    """Per text encoder: the init word's token embeddings, repeated to ``options.vectors`` rows."""
    return word_vectors(components, options.init_word, options.vectors, "the initial word")


def word_vectors(
    components: Components, word: str, count: int | None = None, what: str = "the word"
) -> dict[str, torch.Tensor]:
    """Per text encoder: ``word``'s token embeddings [N, D] as the encoder has them, cycled to ``count``
    rows (default: one per token of the word)."""
    roles = embedding_roles(components)
    if not roles:
        raise UserError(
            f"{components.family.description} models have no CLIP text encoder to train a word for"
        )
    initial = {}
    for role in roles:
        ids = CLIPTokenizer.tokenize(components.tokenizers[role], word)
        if not ids:
            raise UserError(f"{what} {word!r} has no tokens")
        table = components.modules[role].embeddings.token_embedding.weight.detach().float()
        initial[role] = table[[ids[i % len(ids)] for i in range(count or len(ids))]].cpu()
    return initial


def placeholder_tokenizers(components: Components, words: Sequence[Embedding]) -> dict[str, Any]:
    """``components``' tokenizers that also know ``words`` (placeholders: their vectors give only their
    lengths), in order, so that a trained table [sum N, D] holds the words' rows in that order."""
    tokenizers = dict(components.tokenizers)
    for word in words:
        for role in word.vectors:
            base = components.modules[role].config.vocab_size
            tokenizers[role] = TokenizerWithEmbeddings.extend(tokenizers[role], base, role, word)
    return tokenizers


def vectors_condition(
    task: DiffusionTask, vectors: dict[str, torch.Tensor], tokenizers: dict[str, Any], batch
) -> Cond:
    """The family's training condition of ``batch`` with the words' trained input ``vectors`` (per text
    encoder, the table of ``tokenizers``' placeholder ids)."""
    encoders = {role: WithExtraVectors(task.components.modules[role], v) for role, v in vectors.items()}
    components = replace(task.components.with_modules(**encoders), tokenizers=tokenizers)
    return task.family.training_condition(components, batch.captions, task.condition_requests(batch))


# ----------------------------------------------------------------------------------------------- task


class EmbeddingTask(DiffusionTask):
    """The model's denoising loss through frozen networks, with the word's vectors trained."""

    name = "embedding"

    def __init__(self, config: TrainConfig, components: Components, device: torch.device, options) -> None:
        super().__init__(config, components, device)
        self.options = options
        self.network.eval().requires_grad_(False)
        for role in self.text_roles:
            self.components.modules[role].to(device).eval().requires_grad_(False)
        initial = initial_vectors(components, options)
        self.embedding = EmbeddingVectors(initial).to(device)
        self.networks = {"embedding": self.embedding}
        self.tokenizers = placeholder_tokenizers(components, [Embedding(options.token, initial)])

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"embedding": list(self.embedding.parameters())}

    def losses(self, modules: dict[str, nn.Module], batch, random, step: int):
        loss, logs = self.denoising_loss({**modules, self.network_role: self.network}, batch, random)
        return {"embedding": loss}, logs

    @torch.no_grad()
    def evaluate(self, batches: Sequence) -> dict[str, float]:
        return {}

    def open_data(self, config: DataConfig, seed: int) -> DataSplit:
        return self._split()

    def prepare_data(self, split: DataSplit, run_dir: Path, info: Distributed) -> DataSplit:
        if not isinstance(split.source, EmbeddingImages):
            split = self._split()
        return super().prepare_data(split, run_dir, info)

    def _split(self) -> DataSplit:
        if not self.config.data.path:
            raise UserError("textual inversion needs its images: pass --images DIR")
        source = EmbeddingImages(self.config.data.path, self.options.token)
        return DataSplit(source, np.arange(source.size), None, np.arange(0))

    def condition(self, modules: dict[str, nn.Module], batch) -> Cond:
        return vectors_condition(self, modules["embedding"](), self.tokenizers, batch)

    @torch.no_grad()
    def sample_grid(self, batches: Sequence) -> Image.Image | None:
        return None

    def export(self, path: Path, batches: Sequence) -> Components:
        vectors = {role: v.detach() for role, v in self.embedding.vectors.items()}
        save_embedding(
            path / f"{self.options.token}.safetensors", vectors, self.options.token, self.config.max_steps
        )
        return self.components


# ----------------------------------------------------------------------------------------------- runs


def embedding_config(
    model: str, model_config: ModelConfig, images: str | Path, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The textual-inversion defaults for the model at ``model`` (frozen; its resolution; lr 5e-3, no
    weight decay, 500 steps of batch 4) on ``images``, then ``overrides`` (dotted keys, as ``ldm train``)."""
    return frozen_model_config(
        "embedding",
        model,
        model_config,
        EMBEDDING_DEFAULTS,
        overrides,
        architecture_reason="textual inversion keeps the model it loads",
        frozen_reason="textual inversion keeps the model frozen",
        resolution=model_config.sample_size,
        path=str(images),
    )


def train_embedding(
    config: TrainConfig,
    run_dir: str | Path,
    options: EmbeddingOptions,
    *,
    resume: bool = False,
    verbose: bool = False,
):
    """Learn ``options.token`` for ``config.init`` in ``run_dir`` (or continue with ``resume``); the export
    is ``run_dir/export/<token>.safetensors``."""
    from latentdiffusion.training.loop import train

    if not config.init:
        raise UserError("textual inversion needs its model: pass --model PATH")
    options.validate()
    run_dir = Path(run_dir)
    check_options(run_dir, options, resume)

    def task(config: TrainConfig, components: Components, device: torch.device) -> EmbeddingTask:
        return EmbeddingTask(config, components, device, options)

    return train(config, run_dir, resume=resume, task_class=task, verbose=verbose)


def saved_options(run_dir: Path) -> EmbeddingOptions | None:
    """The ``embedding.json`` of a run folder, or None."""
    record = checkpointing.read_run_options(run_dir, OPTIONS_FILE)
    if record is None:
        return None
    try:
        return EmbeddingOptions(record["token"], record["init_word"], int(record["vectors"]))
    except (ValueError, KeyError, TypeError) as error:
        raise UserError(f"cannot read {Path(run_dir) / OPTIONS_FILE}: {error}") from None


def check_options(run_dir: Path, options: EmbeddingOptions, resume: bool) -> None:
    """Save the options with a new run; a resumed run must use the same ones."""
    checkpointing.keep_run_options(run_dir, OPTIONS_FILE, asdict(options), resume, "embedding")
