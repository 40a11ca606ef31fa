"""Latent vs pixel space: the compression-factor study of Rombach et al. 2022 (Sec. 4.1, Fig. 6 and 7)
measured on the shapes world at 64x64.

For each downsampling factor f in ``Budget.factors`` the study trains, with the project's own training
loop, a first stage (f = 1: none, the identity; f > 1: a KL autoencoder of one family, its depth set by
f) and a text-conditioned diffusion model on its latents (one U-Net family: same widths, as many levels
as take the latent down to ``Budget.lowest_side``, attention on the two lowest levels). Every diffusion
model gets the same training budget in FLOPs (forward and backward of one training step as counted by
``torch.utils.flop_counter``, times the number of steps), so the comparison does not depend on the
machine; wall-clock is reported beside it. The first stages' and the feature classifier's costs are
reported separately.

Each model is then sampled with the same sampler, steps and guidance and judged by prompt adherence
(``shapes_checker``) and by a Frechet distance on the features of a classifier trained here
(``evaluation.frechet``). Every stage lives in its own folder under the output folder and is skipped
once its ``result.json`` exists; an interrupted training stage resumes from its last checkpoint, an
interrupted evaluation from its last saved batch of images.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from latentdiffusion.components import build_components
from latentdiffusion.config import SHAPES, AutoencoderConfig, ModelConfig, ScheduleConfig, TextEncoderConfig
from latentdiffusion.errors import UserError
from latentdiffusion.evaluation.frechet import (
    WEIGHTS_FILE,
    ShapesClassifier,
    accuracy,
    feature_distance,
    image_features,
    labelled_batch,
    load_classifier,
    save_classifier,
    train_classifier,
)
from latentdiffusion.evaluation.shapes_checker import check, summarise
from latentdiffusion.evaluation.shapes_eval import eval_prompts
from latentdiffusion.files import atomic_write
from latentdiffusion.pipelines.loading import load_components, load_pipeline
from latentdiffusion.pipelines.pipeline import Pipeline
from latentdiffusion.training import checkpointing
from latentdiffusion.training.config import DiffusionLossConfig, TrainConfig
from latentdiffusion.training.data import Batch
from latentdiffusion.training.distributed import Distributed
from latentdiffusion.training.loop import TASKS, RunResult, Trainer, train
from latentdiffusion.training.presets import get_train_preset
from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor, render, scene_for_prompt

RESULT_FILE, STUDY_FILE = "result.json", "study.json"
IMAGES_DIR, BATCHES_FILE = "images", "batches.jsonl"
PROMPT_SEED, REFERENCE_SEED = 12345, 54321  # shapes-world seeds no training run uses (runs use seed 0)
Log = Callable[[str], None]


@dataclass(frozen=True)
class Budget:
    """Everything that sets the study's size; ``diffusion_flops`` is the equal budget of each U-Net."""

    name: str
    diffusion_flops: float  # training FLOPs per diffusion model (all f alike)
    diffusion_batch: int = 16
    autoencoder_steps: int = 600
    autoencoder_batch: int = 8
    classifier_steps: int = 1500
    classifier_batch: int = 32
    eval_prompts: int = 64  # per caption form (single, relational)
    eval_batch: int = 16
    reference_images: int = 1024  # real images whose features the generated ones are compared with
    sampling_steps: int = 20
    sampler: str = "dpmpp_2m"
    guidance_scale: float = 5.0
    factors: tuple[int, ...] = (1, 2, 4, 8)
    model_channels: int = 64  # U-Net width at full latent resolution (the shapes preset's)
    lowest_side: int = 4  # latent side of the U-Net's lowest level
    autoencoder_widths: tuple[int, int] = (32, 64)  # first level, every deeper level (the shapes preset's)
    autoencoder_groups: int = 16
    # the study as it was run: CLIP's causal text encoder
    text_encoder: TextEncoderConfig = field(default_factory=lambda: replace(SHAPES.text_encoder, causal=True))
    holdout: int = 64  # held-out images for the autoencoders' PSNR/SSIM and the diffusion loss
    checkpoints_per_run: int = 5
    log_every: int = 10


BUDGETS: dict[str, Budget] = {
    "default": Budget(name="default", diffusion_flops=40e12),
    "toy": Budget(
        name="toy",
        diffusion_flops=4e9,
        diffusion_batch=2,
        autoencoder_steps=2,
        autoencoder_batch=2,
        classifier_steps=2,
        classifier_batch=4,
        eval_prompts=2,
        eval_batch=2,
        reference_images=16,
        sampling_steps=2,
        model_channels=32,
        autoencoder_widths=(8, 16),
        autoencoder_groups=8,
        text_encoder=TextEncoderConfig(
            hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=32
        ),
        holdout=2,
        checkpoints_per_run=2,
        log_every=1,
    ),
}


def get_budget(name: str) -> Budget:
    try:
        return BUDGETS[name]
    except KeyError:
        raise UserError(f"unknown budget {name!r}; known: {', '.join(BUDGETS)}") from None


# ------------------------------------------------------------------------------------------ models


def autoencoder_config(budget: Budget, f: int) -> AutoencoderConfig:
    """f = 1: the identity (pixel space); else the shapes autoencoder family with log2(f) + 1 levels."""
    if f == 1:
        return AutoencoderConfig(identity=True, latent_channels=3, scaling_factor=1.0)
    first, deeper = budget.autoencoder_widths
    levels = int(math.log2(f)) + 1
    return replace(
        SHAPES.autoencoder,
        block_channels=(first,) + (deeper,) * (levels - 1),
        norm_groups=budget.autoencoder_groups,
    )


def model_config(budget: Budget, f: int, resolution: int = 64) -> ModelConfig:
    """The shapes model with the U-Net scaled to f's latent: channel_mult (1, 2, 2, ...) down to
    ``lowest_side``, attention on the two lowest levels (8x8 and 4x4 by default) whatever f is."""
    side = resolution // f
    levels = int(math.log2(side // budget.lowest_side)) + 1
    autoencoder = autoencoder_config(budget, f)
    channels = autoencoder.latent_channels
    unet = replace(
        SHAPES.unet,
        in_channels=channels,
        out_channels=channels,
        model_channels=budget.model_channels,
        channel_mult=(1,) + (2,) * (levels - 1),
        attention_levels=tuple(range(max(0, levels - 2), levels)),
        context_dim=budget.text_encoder.hidden_size,
        coordinate_channels=False,  # the study as it was run: plain Stable Diffusion U-Nets ...
    )
    return replace(
        SHAPES,
        name=f"shapes-f{f}",
        unet=unet,
        autoencoder=autoencoder,
        text_encoder=budget.text_encoder,
        schedule=ScheduleConfig(),  # ... on SD's schedule with eps prediction
    )


def _run_settings(budget: Budget, steps: int) -> dict[str, Any]:
    every = budget.log_every * max(1, math.ceil(steps / budget.checkpoints_per_run / budget.log_every))
    return {
        "max_steps": steps,
        "log_every": budget.log_every,
        "eval_every": 0,
        "checkpoint_every": every,  # a multiple of log_every, so resumed throughput logs stay exact
        "keep_checkpoints": 1,
    }


def autoencoder_train_config(budget: Budget, f: int) -> TrainConfig:
    """The ``shapes-autoencoder`` preset for f: L1 + KL only (the PatchGAN never starts)."""
    preset = get_train_preset("shapes-autoencoder")
    steps = budget.autoencoder_steps
    return replace(
        preset,
        name=f"latent-vs-pixel-autoencoder-f{f}",
        model=replace(SHAPES, autoencoder=autoencoder_config(budget, f)),
        data=replace(preset.data, holdout=budget.holdout),
        optim=replace(preset.optim, warmup_steps=max(1, steps // 10)),
        autoencoder_loss=replace(preset.autoencoder_loss, disc_start=steps),
        sample=replace(preset.sample, every=0),
        batch_size=budget.autoencoder_batch,
        **_run_settings(budget, steps),
    )


# The denoising loss the study was run with (the shapes preset's at the time): eps, min-SNR 5, offset 0.05.
STUDY_LOSS = DiffusionLossConfig(min_snr_gamma=5.0, offset_noise=0.05)


def diffusion_train_config(budget: Budget, f: int, autoencoder: str | None, steps: int) -> TrainConfig:
    """The ``shapes`` preset (U-Net and text encoder trained jointly) on f's latents for ``steps`` steps.

    Pixel space passes ``autoencoder=None``: the model's identity first stage has no weights, so the
    loop's "random" (build it from the config) is exactly it.
    """
    preset = get_train_preset("shapes")
    return replace(
        preset,
        name=f"latent-vs-pixel-diffusion-f{f}",
        model=model_config(budget, f),
        autoencoder=autoencoder or "random",
        data=replace(preset.data, holdout=budget.holdout),
        optim=replace(preset.optim, warmup_steps=max(1, steps // 10)),
        diffusion=STUDY_LOSS,
        sample=replace(preset.sample, every=0, prompts=()),
        batch_size=budget.diffusion_batch,
        **_run_settings(budget, steps),
    )


# ------------------------------------------------------------------------------------ measurements


def synthetic_batch(size: int, resolution: int = 64) -> Batch:
    """``size`` shapes-world items as a training ``Batch`` (for counting FLOPs)."""
    items = [ShapesDataset(0)[i] for i in range(size)]
    images = [image.resize((resolution, resolution)) for image, _ in items]
    return Batch(images_to_tensor(images), [caption for _, caption in items], torch.arange(size))


def train_step_flops(config: TrainConfig) -> int:
    """FLOPs of one optimiser step of ``config`` (forward and backward of every network, incl. the frozen
    encoder), counted by ``FlopCounterMode`` on a random-weight model of the same architecture."""
    with torch.random.fork_rng(devices=[]), tempfile.TemporaryDirectory() as folder:
        components = build_components(config.model, seed=config.seed)
        task = TASKS[config.task](config, components, torch.device("cpu"))
        trainer = Trainer(config, Path(folder), task, Distributed())
        batch = synthetic_batch(config.batch_size, config.data.resolution)
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(iter([batch]))
    return int(counter.get_total_flops())


def training_seconds(run_dir: Path, images_per_step: int) -> float:
    """Wall-clock of the training steps, from the run's throughput logs (correct across resumes)."""
    seconds, previous = 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "images_per_s" in record:
            steps = record["step"] - previous
            seconds += steps * images_per_step / max(record["images_per_s"], 1e-9)
            previous = record["step"]
    return seconds


def parameters(module: torch.nn.Module) -> int:
    """Weights of ``module`` (the identity first stage's dtype scalar is not one)."""
    return sum(p.numel() for p in module.parameters() if p.dim() > 0)


# -------------------------------------------------------------------------------------------- stages


def read_result(stage: Path) -> dict[str, Any] | None:
    path = stage / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_result(stage: Path, result: dict[str, Any]) -> dict[str, Any]:
    atomic_write(stage / RESULT_FILE, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2)))
    return result


def run_training(config: TrainConfig, run_dir: Path) -> RunResult:
    """Train, or resume from the run's newest checkpoint when an earlier attempt left one."""
    resume = bool(checkpointing.list_checkpoints(run_dir))
    return train(config, run_dir, resume=resume)


def autoencoder_stage(budget: Budget, f: int, stage: Path) -> dict[str, Any]:
    """Train the first stage for f; PSNR/SSIM of held-out reconstructions (posterior mode, EMA weights)."""
    config = autoencoder_train_config(budget, f)
    flops = train_step_flops(config)
    run = run_training(config, stage)
    components = load_components(str(run.export_dir))
    seconds = training_seconds(stage, config.batch_size)
    return {
        "f": f,
        "latent": [components.config.autoencoder.latent_channels, 64 // f, 64 // f],
        "parameters": parameters(components.autoencoder),
        "steps": config.max_steps,
        "batch_size": config.batch_size,
        "flops_per_step": flops,
        "train_flops": flops * config.max_steps,
        "train_seconds": seconds,
        "images_per_s": config.max_steps * config.batch_size / max(seconds, 1e-9),
        "psnr": run.metrics["eval/psnr"],
        "ssim": run.metrics["eval/ssim"],
        "scaling_factor": components.config.autoencoder.scaling_factor,
        "export": str(run.export_dir),
    }


def diffusion_stage(
    budget: Budget, f: int, stage: Path, autoencoder: str | None, log: Log = print
) -> dict[str, Any]:
    """Train the diffusion model for f under the budget: steps = floor(budget / FLOPs per step), >= 1."""
    # FLOPs depend on the architecture only, so a random-weight model of it is counted.
    flops = train_step_flops(diffusion_train_config(budget, f, None, 1))
    steps = max(1, int(budget.diffusion_flops // flops))
    config = diffusion_train_config(budget, f, autoencoder, steps)
    log(f"  {steps} steps x {config.batch_size} at {flops / 1e9:.1f} GFLOP per step")
    run = run_training(config, stage)
    seconds = training_seconds(stage, config.batch_size)
    components = load_components(str(run.export_dir))
    return {
        "f": f,
        "unet_parameters": parameters(components.unet),
        "channel_mult": list(config.model.unet.channel_mult),
        "steps": steps,
        "batch_size": config.batch_size,
        "flops_per_step": flops,
        "train_flops": flops * steps,
        "train_seconds": seconds,
        "images_per_s": steps * config.batch_size / max(seconds, 1e-9),
        "eval_loss": run.metrics.get("eval/loss"),
        "export": str(run.export_dir),
    }


def classifier_stage(budget: Budget, stage: Path) -> dict[str, Any]:
    """Train the feature classifier; its per-attribute accuracy on 512 unseen images says what it sees."""
    start = time.perf_counter()
    model = train_classifier(budget.classifier_steps, budget.classifier_batch)
    seconds = time.perf_counter() - start
    save_classifier(model, stage / WEIGHTS_FILE)
    x, labels = labelled_batch(ShapesDataset(REFERENCE_SEED + 1), 0, max(budget.reference_images // 2, 8))
    return {
        "steps": budget.classifier_steps,
        "batch_size": budget.classifier_batch,
        "train_seconds": seconds,
        "accuracy": accuracy(model, x, labels),
        "weights": str(stage / WEIGHTS_FILE),
    }


def evaluation_prompts(budget: Budget) -> list[tuple[str, str]]:
    """(form, prompt) pairs: ``eval_prompts`` random prompts per caption form, a fixed seed."""
    prompts = eval_prompts(budget.eval_prompts, PROMPT_SEED)
    return [(form, prompt) for form, items in prompts.items() for prompt in items]


def reference_features(budget: Budget, classifier: ShapesClassifier) -> np.ndarray:
    """Features of ``reference_images`` real shapes-world images (the training distribution)."""
    dataset = ShapesDataset(REFERENCE_SEED)
    return image_features(classifier, [dataset[i][0] for i in range(budget.reference_images)])


def score_images(
    images: list[Image.Image],
    prompts: list[tuple[str, str]],
    classifier: ShapesClassifier,
    reference: np.ndarray,
) -> dict[str, Any]:
    """Adherence (all prompts, and "all" per form) and the Frechet distance to the reference features."""
    checks = [check(image, prompt) for image, (_, prompt) in zip(images, prompts, strict=True)]
    per_form = {
        form: summarise([c for c, (f, _) in zip(checks, prompts, strict=True) if f == form])["all"]
        for form in dict.fromkeys(f for f, _ in prompts)
    }
    return {
        "adherence": summarise(checks),
        "adherence_by_form": per_form,
        "frechet_distance": feature_distance(image_features(classifier, images), reference),
        "images": len(images),
    }


def generate_images(
    pipe: Pipeline, budget: Budget, prompts: list[tuple[str, str]], stage: Path
) -> list[Image.Image]:
    """Image i for prompt i with seed i, in batches; each finished batch is saved (PNG) with its
    wall-clock and CPU time, so an interrupted evaluation continues after its last saved batch."""
    folder = stage / IMAGES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for start in range(0, len(prompts), budget.eval_batch):
        paths = [folder / f"{i:05d}.png" for i in range(start, min(start + budget.eval_batch, len(prompts)))]
        if not all(p.is_file() for p in paths):
            batch = [prompt for _, prompt in prompts[start : start + len(paths)]]
            _generate_batch(pipe, budget, batch, start, paths, stage / BATCHES_FILE)
        images += [Image.open(p).convert("RGB") for p in paths]
    return images


def _generate_batch(
    pipe: Pipeline, budget: Budget, prompts: list[str], seed: int, paths: list[Path], timings: Path
) -> None:
    wall, cpu = time.perf_counter(), time.process_time()
    batch = pipe.generate(
        prompts,
        steps=budget.sampling_steps,
        sampler=budget.sampler,
        guidance_scale=budget.guidance_scale,
        seed=seed,
    )
    record = {"start": seed, "images": len(prompts), "seconds": time.perf_counter() - wall}
    record["cpu_seconds"] = time.process_time() - cpu
    for image, path in zip(batch, paths, strict=True):
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
    with open(timings, "a") as log:
        log.write(json.dumps(record) + "\n")


def sampling_costs(pipe: Pipeline, budget: Budget) -> dict[str, float]:
    """U-Net FLOPs per image and sampling step (both guidance passes) and FLOPs of one whole image
    (text encoder, every U-Net call, decoder), counted by ``FlopCounterMode``."""
    config = pipe.config
    f = config.autoencoder.downsampling_factor
    x = torch.zeros(2, config.unet.in_channels, config.sample_size // f, config.sample_size // f)
    context = torch.zeros(2, config.text_encoder.max_length, config.unet.context_dim)
    with torch.no_grad(), FlopCounterMode(display=False) as unet_counter:
        pipe.unet(x, torch.tensor([500, 500]), context)
    with FlopCounterMode(display=False) as image_counter:
        pipe.generate(
            "a red circle on a blue background",
            steps=budget.sampling_steps,
            sampler=budget.sampler,
            guidance_scale=budget.guidance_scale,
        )
    return {
        "unet_flops_per_step": unet_counter.get_total_flops(),
        "flops_per_image": image_counter.get_total_flops(),
    }


def sampling_seconds(stage: Path) -> dict[str, float]:
    """Seconds per image over every generated batch (wall-clock and CPU time of this process)."""
    records = [json.loads(line) for line in (stage / BATCHES_FILE).read_text().splitlines() if line.strip()]
    count = sum(r["images"] for r in records)
    return {
        "seconds_per_image": sum(r["seconds"] for r in records) / count,
        "cpu_seconds_per_image": sum(r["cpu_seconds"] for r in records) / count,
    }


def evaluation_stage(
    budget: Budget,
    f: int,
    stage: Path,
    export: str,
    classifier: ShapesClassifier,
    reference: Callable[[], np.ndarray],
) -> dict[str, Any]:
    """Sample every evaluation prompt with the model of f and score the images."""
    pipe = load_pipeline(export)
    prompts = evaluation_prompts(budget)
    images = generate_images(pipe, budget, prompts, stage)
    result = {"f": f, **score_images(images, prompts, classifier, reference())}
    return result | sampling_costs(pipe, budget) | sampling_seconds(stage)


def data_stage(
    budget: Budget, classifier: ShapesClassifier, reference: Callable[[], np.ndarray]
) -> dict[str, Any]:
    """The same scores for real images of the evaluation prompts: the checker's ceiling and the
    distance's floor at this sample size."""
    prompts = evaluation_prompts(budget)
    rng = np.random.default_rng(REFERENCE_SEED)
    images = [render(scene_for_prompt(prompt, rng)) for _, prompt in prompts]
    return score_images(images, prompts, classifier, reference())


# ---------------------------------------------------------------------------------------- the study


@dataclass
class StudyResults:
    """Every stage's result; dict keys are the factors f."""

    budget: Budget
    autoencoders: dict[int, dict[str, Any]] = field(default_factory=dict)
    diffusion: dict[int, dict[str, Any]] = field(default_factory=dict)
    evaluation: dict[int, dict[str, Any]] = field(default_factory=dict)
    classifier: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)


def run_stage(name: str, folder: Path, make: Callable[[], dict[str, Any]], log: Log) -> dict[str, Any]:
    """``make()``'s result, computed once: a stage whose ``result.json`` exists is skipped."""
    done = read_result(folder)
    if done is not None:
        log(f"{name}: done earlier, skipped ({folder})")
        return done
    log(f"{name}: running in {folder}")
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = make()
    result["stage_seconds"] = time.perf_counter() - start  # this session only, if it was resumed
    log(f"{name}: finished in {result['stage_seconds'] / 60:.1f} min")
    return write_result(folder, result)


def check_study_folder(out: Path, budget: Budget) -> None:
    """An output folder holds one budget's stages; another budget must use another folder."""
    path = out / STUDY_FILE
    settings = json.loads(json.dumps(asdict(budget)))
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != settings:
            raise UserError(
                f"{out} holds a study with budget {saved.get('name')!r} and other settings; "
                "pass another --out (finished stages would otherwise be mixed with new ones)"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2)))


def run_study(budget: Budget, out: Path, *, log: Log = print) -> StudyResults:
    """Run (or continue) every stage of the study in ``out`` and return all results."""
    check_study_folder(out, budget)
    results = StudyResults(budget)
    for f in (f for f in budget.factors if f > 1):
        folder = out / f"autoencoder-f{f}"
        make = partial(autoencoder_stage, budget, f, folder)
        results.autoencoders[f] = run_stage(f"autoencoder f={f}", folder, make, log)
    folder = out / "classifier"
    results.classifier = run_stage(
        "feature classifier", folder, partial(classifier_stage, budget, folder), log
    )
    for f in budget.factors:
        folder, first_stage = out / f"diffusion-f{f}", results.autoencoders.get(f, {}).get("export")
        make = partial(diffusion_stage, budget, f, folder, first_stage, log)
        results.diffusion[f] = run_stage(f"diffusion f={f}", folder, make, log)
    evaluate_all(budget, out, results, log)
    return results


class LazyReference:
    """The reference features, computed on first use (not at all when every evaluation is done)."""

    def __init__(self, budget: Budget, classifier: ShapesClassifier) -> None:
        self.budget, self.classifier, self.value = budget, classifier, None

    def __call__(self) -> np.ndarray:
        if self.value is None:
            self.value = reference_features(self.budget, self.classifier)
        return self.value


def evaluate_all(budget: Budget, out: Path, results: StudyResults, log: Log) -> None:
    """Sample and score every model, then the real images of the same prompts."""
    classifier = load_classifier(Path(results.classifier["weights"]))
    reference = LazyReference(budget, classifier)
    for f in budget.factors:
        folder, export = out / f"evaluation-f{f}", results.diffusion[f]["export"]
        make = partial(evaluation_stage, budget, f, folder, export, classifier, reference)
        results.evaluation[f] = run_stage(f"evaluation f={f}", folder, make, log)
    folder = out / "evaluation-data"
    results.data = run_stage("real images", folder, partial(data_stage, budget, classifier, reference), log)
