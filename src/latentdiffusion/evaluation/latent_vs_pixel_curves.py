"""Latent vs pixel space against training compute: quality curves per downsampling factor f, the form of
Rombach et al. 2022, Fig. 6 and 7 (quality against training progress for LDM-1 ... LDM-32).

For each f one *stage* trains the first stage to convergence (f > 1: rounds of ``autoencoder_round`` steps
until held-out PSNR gains less than ``autoencoder_min_gain`` dB per round), then trains the diffusion model
with a constant learning rate after warm-up and, at fixed training-FLOP checkpoints (a log grid shared by
every f: ``points_per_decade`` points per decade from ``first_flops``), samples ``prompts`` single-object
prompts and scores whole-prompt adherence (``shapes_checker``) and FD-shapes (``evaluation.frechet``).
The learning rate does not depend on how far a run goes, so a curve is extended by asking for a larger
``until`` later; each point's quality is that of the model after its FLOPs, whatever the final budget.

Every measured number goes into one small JSON file per stage under ``results`` (meant to be committed):
the settings, the first stage's convergence history and the weights digest, and the curve's points.
Training checkpoints (hundreds of MB) stay in the run folder. Resuming on the same machine continues from
the newest checkpoint; on a machine without the run folder the stage retrains from step 0 (the loop is
deterministic for a seed) and evaluates only the checkpoints the results file lacks; a first stage that
retrains to other weights is refused while the file holds points measured with the old one. A new
curve can start on another results file's converged first stage (``adopt_first_stage``), copied from its
run folder and checked against its digest. The feature
classifier behind FD-shapes is trained once and its weights (fp16, 0.4 MB) kept beside the results, so
every point of every curve is measured with the same features.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.config import SHAPES, TextEncoderConfig
from latentdiffusion.errors import UserError
from latentdiffusion.evaluation import latent_vs_pixel as lvp
from latentdiffusion.evaluation.frechet import accuracy, labelled_batch, load_classifier, train_classifier
from latentdiffusion.evaluation.latent_vs_pixel_report import machine_description
from latentdiffusion.evaluation.shapes_eval import eval_prompts
from latentdiffusion.files import atomic_write
from latentdiffusion.pipelines.loading import load_components, load_pipeline
from latentdiffusion.pipelines.text_to_image import tensor_to_images
from latentdiffusion.training import checkpointing
from latentdiffusion.training.config import TrainConfig, apply_overrides
from latentdiffusion.training.presets import get_train_preset
from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor, render, scene_for_prompt

CLASSIFIER_WEIGHTS, CLASSIFIER_FILE = "classifier.safetensors", "classifier.json"
FORM = "single"  # the curves judge single-object prompts (the default model's quality range: README)
# Every checkpoint is also sampled at this guidance, the default model's best (its sweep, README): late in
# training the curves' fixed guidance 3 understates a checkpoint by 20-30 points (the f = 4 probes).
SECOND_GUIDANCE = 1.5
Log = Callable[[str], None]


@dataclass(frozen=True)
class CurveBudget:
    """The settings of the curves; ``study`` sets model sizes, sampling and the feature classifier."""

    name: str
    study: lvp.Budget
    first_flops: float = 1e13  # the grid's first checkpoint (training FLOPs of the diffusion model)
    points_per_decade: int = 4  # checkpoints at first_flops * 10^(k / points_per_decade)
    prompts: int = 64  # single-object prompts sampled at every checkpoint
    # Share of two-object scenes in the diffusion models' training data (the shapes preset's is 0.75).
    # The curves are scored on single-object prompts; trained on the preset's mix, f = 4 still drew blobs
    # at 1 PFLOP (1.6% whole prompt) where a single-object run drew 42% (docs/latent-vs-pixel.md).
    relational_fraction: float = 0.0
    warmup_steps: int = 100  # then a constant learning rate (a point must not depend on the budget)
    save_every: int = 250  # diffusion checkpoints within a segment (an interrupted one resumes there)
    autoencoder_round: int = 500
    autoencoder_min_gain: float = 0.2  # dB of held-out PSNR per round: below it, converged
    autoencoder_max_steps: int = 12000


def _curve_study(base: lvp.Budget, **changes: Any) -> lvp.Budget:
    # The default model's recipe (the shapes preset, README): bidirectional text encoder, guidance 3.
    return replace(base, guidance_scale=SHAPES.default_guidance_scale, **changes)


CURVE_BUDGETS: dict[str, CurveBudget] = {
    "default": CurveBudget(
        name="default",
        study=_curve_study(lvp.BUDGETS["default"], name="curves", text_encoder=SHAPES.text_encoder),
    ),
    "toy": CurveBudget(
        name="toy",
        study=_curve_study(
            lvp.BUDGETS["toy"],
            name="curves-toy",
            text_encoder=TextEncoderConfig(
                hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_length=32, causal=False
            ),
        ),
        first_flops=1e9,
        points_per_decade=2,
        prompts=2,
        warmup_steps=1,
        save_every=2,
        autoencoder_round=1,
        autoencoder_min_gain=100.0,  # converged after its second round
        autoencoder_max_steps=3,
    ),
}


# The first curves' recipe: the shapes preset's scene mix (their results: benchmarks/results/latent-vs-pixel/
# scene-mix/); kept so that those results load and their tables can be regenerated.
CURVE_BUDGETS["mix"] = replace(CURVE_BUDGETS["default"], name="mix", relational_fraction=0.75)


def get_curve_budget(name: str) -> CurveBudget:
    try:
        return CURVE_BUDGETS[name]
    except KeyError:
        raise UserError(f"unknown curve budget {name!r}; known: {', '.join(CURVE_BUDGETS)}") from None


# ------------------------------------------------------------------------------------ the schedule


GRID_SLACK = 0.01  # in grid steps: 3.16e14 stands for 10^14.5 = 3.1623e14


def checkpoint_flops(budget: CurveBudget, until: float) -> list[float]:
    """The grid's training-FLOP checkpoints up to ``until``: first_flops * 10^(k / points_per_decade).

    ``until`` as people write it (3.16e14 for 10^14.5) names the grid point it rounds to: a point within
    ``GRID_SLACK`` of a grid step above ``until`` is included."""
    steps = budget.points_per_decade * math.log10(until / budget.first_flops) if until > 0 else -1.0
    if steps + GRID_SLACK < 0:
        raise UserError(f"--until {until:g} is below the first checkpoint ({budget.first_flops:g} FLOPs)")
    count = math.floor(steps + GRID_SLACK) + 1
    return [budget.first_flops * 10 ** (k / budget.points_per_decade) for k in range(count)]


def checkpoint_steps(flops: list[float], flops_per_step: int) -> list[int]:
    """The first step at which each checkpoint's FLOPs are spent (ascending, without repeats)."""
    return sorted({max(1, math.ceil(f / flops_per_step - 1e-9)) for f in flops})


# --------------------------------------------------------------------------------- the results file


def settings(budget: CurveBudget, f: int) -> dict[str, Any]:
    """What a stage's points depend on; a results file with other settings is not continued."""
    return json.loads(json.dumps({"budget": asdict(budget), "f": f}))


def read_results(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_results(path: Path, results: dict[str, Any]) -> dict[str, Any]:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1) + "\n"))
    return results


def new_results(stage_settings: dict[str, Any]) -> dict[str, Any]:
    """A stage's results before any work: its settings, nothing trained or measured."""
    return {"settings": stage_settings, "first_stage": None, "diffusion": None, "points": []}


def open_results(path: Path, budget: CurveBudget, f: int, resume: bool) -> dict[str, Any]:
    """The stage's results so far: a new record, or (with ``resume``) the file's, if its settings match."""
    saved = read_results(path)
    if saved is None and resume:
        raise UserError(
            f"there is no f={f} curve to continue ({path} does not exist); drop --resume to start it"
        )
    if saved is None:
        return new_results(settings(budget, f))
    if not resume:
        raise UserError(f"{path} already holds results of f={f}; pass --resume to continue that curve")
    if saved["settings"] != settings(budget, f):
        raise UserError(
            f"{path} was measured with other settings (budget {saved['settings']['budget']['name']!r}); "
            "pass another --results folder"
        )
    return saved


def append_point(path: Path, results: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """Add one checkpoint's scores (kept in step order) and write the file at once."""
    points = [p for p in results["points"] if p["step"] != point["step"]] + [point]
    return write_results(path, results | {"points": sorted(points, key=lambda p: p["step"])})


# ------------------------------------------------------------------------------------------ helpers


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's tensors (names, shapes and bytes): which first stage a curve was run on."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def provenance() -> dict[str, str]:
    """Where and when a result was measured (machine description, date)."""
    return {"machine": machine_description(), "date": datetime.date.today().isoformat()}


def single_prompts(budget: CurveBudget) -> list[tuple[str, str]]:
    """The first ``prompts`` single-object prompts of the one-budget study (same seed)."""
    return [(FORM, prompt) for prompt in eval_prompts(budget.prompts, lvp.PROMPT_SEED)[FORM]]


# ---------------------------------------------------------------------------------- feature classifier


def classifier_stage(budget: CurveBudget, results: Path, log: Log = print) -> dict[str, Any]:
    """Train the feature classifier once (fp16 weights beside the results) and score real images of the
    curve prompts: the checker's ceiling and FD-shapes' floor at this sample size."""
    path, weights = results / CLASSIFIER_FILE, results / CLASSIFIER_WEIGHTS
    done = read_results(path)
    if done is not None and done["settings"] != json.loads(json.dumps(asdict(budget.study))):
        raise UserError(f"{path} belongs to another budget's curves; pass another --results folder")
    if done is not None and weights.is_file():
        return done
    log(f"feature classifier: training ({budget.study.classifier_steps} steps)")
    start = time.perf_counter()
    model = train_classifier(budget.study.classifier_steps, budget.study.classifier_batch, log=log)
    seconds = time.perf_counter() - start
    save_safetensors({k: v.half().contiguous() for k, v in model.state_dict().items()}, weights)
    model = load_classifier(weights)  # the features every point uses come from the fp16 weights
    x, labels = labelled_batch(ShapesDataset(lvp.REFERENCE_SEED + 1), 0, 512)
    prompts = single_prompts(budget)
    data = lvp.score_images(real_images(prompts), prompts, model, lvp.reference_features(budget.study, model))
    record = {"settings": json.loads(json.dumps(asdict(budget.study))), "train_seconds": seconds}
    record |= {
        "accuracy": accuracy(model, x, labels),
        "data": data,
        **provenance(),
    }
    return write_results(path, record)


def real_images(prompts: list[tuple[str, str]]) -> list[Image.Image]:
    """A rendered scene for each curve prompt (the real images every score is set against)."""
    rng = np.random.default_rng(lvp.REFERENCE_SEED)
    return [render(scene_for_prompt(prompt, rng)) for _, prompt in prompts]


# -------------------------------------------------------------------------------------- first stage


def autoencoder_config(budget: CurveBudget, f: int, steps: int) -> TrainConfig:
    """The study's first stage for f at a constant learning rate after warm-up, run to ``steps``."""
    config = lvp.autoencoder_train_config(replace(budget.study, autoencoder_steps=steps), f)
    preset = get_train_preset("shapes-autoencoder")
    every = {"checkpoint_every": budget.autoencoder_round, "eval_every": 0, "keep_checkpoints": 1}
    return replace(
        config,
        optim=replace(config.optim, warmup_steps=preset.optim.warmup_steps, schedule="constant"),
        autoencoder_loss=replace(config.autoencoder_loss, disc_start=budget.autoencoder_max_steps + 1),
        **every,
    )


def converged(history: list[dict[str, Any]], budget: CurveBudget) -> bool:
    """The last round gained less than ``autoencoder_min_gain`` dB, or the step limit is reached."""
    if history and history[-1]["step"] >= budget.autoencoder_max_steps:
        return True
    return len(history) >= 2 and history[-1]["psnr"] - history[-2]["psnr"] < budget.autoencoder_min_gain


def first_stage(
    budget: CurveBudget, f: int, run_dir: Path, recorded: dict | None, save: Callable[[dict], None], log: Log
) -> dict:
    """Train f's autoencoder round by round to convergence, ``save`` ing the record after every round;
    a converged ``recorded`` (the results file's) is only retrained to its steps where this machine lacks
    the run."""
    # FLOPs per step depend on the architecture only (counted once, on any step count)
    flops = recorded["flops_per_step"] if recorded else lvp.train_step_flops(autoencoder_config(budget, f, 1))
    if recorded and recorded["converged"]:
        if _trained_steps(run_dir) != recorded["steps"] or not (run_dir / "export").is_dir():
            log(f"  first stage f={f}: retraining to its recorded {recorded['steps']} steps")
            lvp.run_training(autoencoder_config(budget, f, recorded["steps"]), run_dir)
        return _first_stage_record(budget, f, run_dir, recorded["history"], flops)
    history, record = list(recorded["history"]) if recorded else [], recorded
    while not converged(history, budget):
        steps = (history[-1]["step"] if history else 0) + budget.autoencoder_round
        log(f"  first stage f={f}: training to step {steps}")
        run = lvp.run_training(autoencoder_config(budget, f, steps), run_dir)
        history.append({"step": steps, "psnr": run.metrics["eval/psnr"], "ssim": run.metrics["eval/ssim"]})
        record = _first_stage_record(budget, f, run_dir, history, flops)
        save(record)
    return record


def _trained_steps(run_dir: Path) -> int:
    return max((step for step, _ in checkpointing.list_checkpoints(run_dir)), default=0)


def _first_stage_record(budget: CurveBudget, f: int, run_dir: Path, history: list[dict], flops: int) -> dict:
    steps = history[-1]["step"]
    config = autoencoder_config(budget, f, steps)
    components = load_components(str(run_dir / "export"))
    seconds = lvp.training_seconds(run_dir, config.batch_size)
    return {
        "f": f,
        "latent": [components.config.autoencoder.latent_channels, 64 // f, 64 // f],
        "parameters": lvp.parameters(components.autoencoder),
        "steps": steps,
        "batch_size": config.batch_size,
        "converged": converged(history, budget),
        "history": history,
        "psnr": history[-1]["psnr"],
        "ssim": history[-1]["ssim"],
        "flops_per_step": flops,
        "train_flops": flops * steps,
        "train_seconds": seconds,
        "weights": weights_digest(components.autoencoder),
        "export": str(run_dir / "export"),
    }


@torch.inference_mode()
def reconstruction_scores(
    budget: CurveBudget, export: str, classifier, reference: Callable[[], np.ndarray]
) -> dict[str, Any]:
    """The curve prompts' real images encoded (posterior mean) and decoded by a first stage, scored as a
    checkpoint's samples are: the adherence and FD-shapes a perfect denoiser in its latent space could
    reach at most."""
    autoencoder = load_components(export).autoencoder.float().eval()
    prompts = single_prompts(budget)
    x = images_to_tensor(real_images(prompts))
    decoded = [
        autoencoder.decode(autoencoder.encode(part).mode()) for part in x.split(budget.study.eval_batch)
    ]
    images = tensor_to_images(torch.cat(decoded).clamp(-1, 1))
    scores = lvp.score_images(images, prompts, classifier, reference())
    return {"adherence": scores["adherence"]["all"], "fd": scores["frechet_distance"]}


FIRST_STAGE_KEYS = ("autoencoder_round", "autoencoder_min_gain", "autoencoder_max_steps")


def first_stage_settings(stage_settings: dict[str, Any]) -> dict[str, Any]:
    """The part of a stage's settings its first stage depends on (not the scene mix, grid or prompts)."""
    budget = stage_settings["budget"]
    return {
        "f": stage_settings["f"],
        "study": budget["study"],
        **{k: budget.get(k) for k in FIRST_STAGE_KEYS},
    }


def adopt_first_stage(budget: CurveBudget, f: int, donor: Path, run_dir: Path) -> dict[str, Any]:
    """The converged first stage recorded in another results file (a curve of another budget, a probe)
    whose first-stage settings match, with its run folder copied to ``run_dir`` and its weights checked
    against the recorded digest: a new curve on the same first stage, without training it again."""
    try:
        saved = read_results(donor)
        record = (saved or {}).get("first_stage")
        same = record and first_stage_settings(saved["settings"]) == first_stage_settings(settings(budget, f))
        converged = bool(record) and record.get("converged") is True
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{donor} is not a curve's results file") from None
    if not converged:
        raise UserError(f"{donor} holds no converged first stage to take over")
    if not same:
        raise UserError(f"{donor}'s first stage was trained for another f or with other first-stage settings")
    source = Path(record["export"]).parent
    if not (source / "export").is_dir():
        raise UserError(f"{donor}'s first stage is not on this machine ({source}); train this curve's own")
    if run_dir.exists():
        raise UserError(f"{run_dir} exists already; move it aside to take over {donor}'s first stage")
    partial = run_dir.with_name(run_dir.name + ".partial")  # renamed once whole and checked
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    found = weights_digest(load_components(str(partial / "export")).autoencoder)
    if found != record["weights"]:
        shutil.rmtree(partial)
        raise UserError(f"{source} holds other weights ({found}) than {donor} recorded ({record['weights']})")
    partial.rename(run_dir)
    return record | {"export": str(run_dir / "export")}


def check_same_first_stage(recorded: dict | None, current: dict, points: list, path: Path) -> None:
    if recorded and points and recorded["weights"] != current["weights"]:
        raise UserError(
            f"the first stage of f={current['f']} retrained to other weights ({current['weights']}) than the "
            f"{len(points)} points in {path} were measured with ({recorded['weights']}); move that file "
            "aside to start the curve over"
        )


# ----------------------------------------------------------------------------------------- diffusion


def diffusion_config(
    budget: CurveBudget, f: int, autoencoder: str | None, steps: int, overrides: dict[str, Any] | None = None
) -> TrainConfig:
    """The shapes preset's recipe (v target, zero terminal SNR, shifted timesteps, coordinate channels,
    bidirectional text encoder) on f's latents, with the budget's scene mix and a constant learning rate
    after ``warmup_steps``;
    ``overrides`` (dotted config keys, as ``ldm train --key=value``) change it for a probe."""
    preset = get_train_preset("shapes")
    config = lvp.diffusion_train_config(budget.study, f, autoencoder, steps)
    model = lvp.model_config(budget.study, f)
    model = replace(model, unet=replace(model.unet, coordinate_channels=True), schedule=SHAPES.schedule)
    config = replace(
        config,
        name=f"latent-vs-pixel-curve-f{f}",
        model=replace(model, default_guidance_scale=SHAPES.default_guidance_scale),
        data=replace(
            preset.data, holdout=budget.study.holdout, shapes_relational_fraction=budget.relational_fraction
        ),
        optim=replace(preset.optim, warmup_steps=budget.warmup_steps, schedule="constant"),
        diffusion=preset.diffusion,
        checkpoint_every=budget.save_every,  # and one at the end of every segment (Trainer.finish)
        keep_checkpoints=1,
    )
    return apply_overrides(config, overrides or {})


def diffusion_record(budget: CurveBudget, f: int) -> dict[str, Any]:
    """Per-step training FLOPs and per-image sampling FLOPs of f's architecture (random weights)."""
    config = diffusion_config(budget, f, None, 1)
    from latentdiffusion.components import build_components
    from latentdiffusion.pipelines.pipeline import Pipeline

    pipe = Pipeline(build_components(config.model, seed=0))
    return {
        "flops_per_step": lvp.train_step_flops(config),
        "batch_size": config.batch_size,
        "unet_parameters": lvp.parameters(pipe.unet),
        "channel_mult": list(config.model.unet.channel_mult),
        **lvp.sampling_costs(pipe, budget.study),
    }


def evaluate_checkpoint(
    budget: CurveBudget, export: Path, folder: Path, classifier, reference: Callable[[], np.ndarray]
) -> dict[str, Any]:
    """Score a checkpoint at the curves' guidance, and again at ``SECOND_GUIDANCE`` (under that key)."""
    pipe = load_pipeline(str(export))
    point = sample_and_score(pipe, budget, folder, classifier, reference)
    second = with_guidance(budget, SECOND_GUIDANCE)
    other = sample_and_score(pipe, second, folder / f"guidance-{SECOND_GUIDANCE:g}", classifier, reference)
    scores = {key: other[key] for key in ("adherence", "attributes", "fd")}
    return point | {"second_guidance": {"guidance": SECOND_GUIDANCE, **scores}}


def score_checkpoint(
    budget: CurveBudget, export: str | Path, folder: Path, classifier, reference: Callable[[], np.ndarray]
) -> dict[str, Any]:
    """A finished model's scores at ``budget``'s guidance alone, sampled as a curve point is."""
    return sample_and_score(load_pipeline(str(export)), budget, folder, classifier, reference)


def with_guidance(budget: CurveBudget, guidance: float) -> CurveBudget:
    return replace(budget, study=replace(budget.study, guidance_scale=guidance))


def sample_and_score(
    pipe, budget: CurveBudget, folder: Path, classifier, reference: Callable[[], np.ndarray]
) -> dict[str, Any]:
    """Sample the curve prompts (prompt i with seed i, as the one-budget study) and score them."""
    prompts = single_prompts(budget)
    images = lvp.generate_images(pipe, budget.study, prompts, folder)
    scores = lvp.score_images(images, prompts, classifier, reference())
    return {
        "adherence": scores["adherence"]["all"],
        "attributes": {k: v for k, v in scores["adherence"].items() if k != "all"},
        "fd": scores["frechet_distance"],
        **lvp.sampling_seconds(folder),
    }


def run_stage(
    budget: CurveBudget, f: int, until: float, out: Path, results: Path, *, resume: bool, log: Log = print,
    first_stage_from: Path | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train (or continue) f's first stage and diffusion model up to ``until`` training FLOPs, scoring
    every grid checkpoint the results file lacks; returns the stage's results. ``first_stage_from``: a
    results file whose converged first stage a new curve takes over (``adopt_first_stage``)."""
    checkpoint_flops(budget, until)  # refuse a bad budget before any work
    path = results / f"f{f}.json"
    record = open_results(path, budget, f, resume)
    if first_stage_from is not None:
        if f == 1:
            raise UserError("pixel space (f = 1) has no first stage to take over")
        if record["first_stage"] is not None:
            raise UserError(f"{path} has its first stage already; --first-stage-from starts a new curve")
        adopted = adopt_first_stage(budget, f, first_stage_from, out / f"autoencoder-f{f}")
        log(f"  first stage f={f}: taken over from {first_stage_from} (weights {adopted['weights']})")
        record = record | {"first_stage": adopted}
    classifier_record = classifier_stage(budget, results, log)
    record = write_results(path, record)  # from now on the stage, however interrupted, takes --resume
    judge = load_judge(budget, results)
    autoencoder = None
    if f > 1:
        record = recorded_first_stage(budget, f, out, path, record, judge, log)
        autoencoder = record["first_stage"]["export"]
    record = diffusion_curve(budget, f, until, out, path, record, autoencoder, judge, log)
    return record | {"data": classifier_record["data"]}


def load_judge(budget: CurveBudget, results: Path) -> tuple[Any, Callable[[], np.ndarray]]:
    """The committed feature classifier under ``results`` and the real images' features it scores against
    (computed when first needed): what every curve point, reconstruction and probe is scored with."""
    weights = results / CLASSIFIER_WEIGHTS
    if not weights.is_file():
        raise UserError(f"no feature classifier in {results}: run the curves' classifier stage first")
    classifier = load_classifier(weights)
    return classifier, lvp.LazyReference(budget.study, classifier)


def recorded_first_stage(
    budget: CurveBudget, f: int, out: Path, path: Path, record: dict, judge: tuple, log: Log
) -> dict[str, Any]:
    """Train (or retrain, or find) f's first stage, refuse one with other weights than the points were
    measured with, score its reconstructions once and write it into the results at ``path``."""
    recorded = record["first_stage"]

    def save(partial: dict) -> None:
        write_results(path, record | {"first_stage": partial})

    current = first_stage(budget, f, out / f"autoencoder-f{f}", recorded, save, log)
    check_same_first_stage(recorded, current, record["points"], path)
    same = recorded is not None and recorded["weights"] == current["weights"]
    ceiling = recorded.get("reconstruction") if same else None
    current["reconstruction"] = ceiling or reconstruction_scores(budget, current["export"], *judge)
    return write_results(path, record | {"first_stage": current})


def diffusion_curve(
    budget: CurveBudget, f: int, until: float, out: Path, path: Path, record: dict, autoencoder: str | None,
    judge: tuple, log: Log, overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Train f's diffusion model checkpoint by checkpoint, appending each one's scores to ``path``
    (``overrides``: a probe's changes to the recipe, see ``diffusion_config``)."""
    if record["diffusion"] is None:
        record = write_results(path, record | {"diffusion": diffusion_record(budget, f)})
    flops_per_step, batch = record["diffusion"]["flops_per_step"], record["diffusion"]["batch_size"]
    done, run_dir = {p["step"] for p in record["points"]}, out / f"diffusion-f{f}"
    for step in checkpoint_steps(checkpoint_flops(budget, until), flops_per_step):
        if step in done:
            continue
        if _trained_steps(run_dir) > step:
            log(f"  step {step}: the run folder is past it and the results file lacks it; skipped")
            continue
        log(f"  diffusion f={f}: training to step {step} ({step * flops_per_step / 1e12:.2f} TFLOP)")
        run = lvp.run_training(diffusion_config(budget, f, autoencoder, step, overrides), run_dir)
        folder = out / f"evaluation-f{f}" / f"step-{step:06d}"
        point = {"step": step, "flops": step * flops_per_step, "images": step * batch}
        point["train_seconds"] = lvp.training_seconds(run_dir, batch)
        point |= evaluate_checkpoint(budget, run.export_dir, folder, *judge)
        point |= {"eval_loss": run.metrics.get("eval/loss"), **provenance()}
        record = append_point(path, record, point)
        log(f"  step {step}: adherence {100 * point['adherence']:.1f}%, FD-shapes {point['fd']:.1f}")
    return record


# ------------------------------------------------------------------------------------ reading curves


@dataclass
class Curves:
    """Every stage's results file found under a results folder, the real images' scores, and the recipe
    probes' records committed beside them (``latent_vs_pixel_probes``)."""

    budget: CurveBudget
    stages: dict[int, dict[str, Any]] = field(default_factory=dict)
    data: dict[str, Any] | None = None
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_curves(budget: CurveBudget, results: Path, factors: tuple[int, ...] = (1, 2, 4, 8, 16)) -> Curves:
    curves = Curves(budget)
    for f in factors:
        record = read_results(results / f"f{f}.json")
        if record is not None and record["settings"] == settings(budget, f):
            curves.stages[f] = record
    classifier = read_results(results / CLASSIFIER_FILE)
    curves.data = classifier["data"] if classifier else None
    from latentdiffusion.evaluation.latent_vs_pixel_probes import PROBES_DIR, load_probes  # it imports this

    curves.probes = load_probes(budget, results / PROBES_DIR)
    return curves


def cpu_seconds_per_image(stage: dict[str, Any]) -> float | None:
    """The sampling cost of one image in CPU seconds: the median over the stage's checkpoints (one
    architecture, so one cost; the median resists load). CPU time, not wall-clock, so that checkpoints
    sampled on one thread and on two compare: two threads halve the wait, not the work."""
    values = [p["cpu_seconds_per_image"] for p in stage["points"]]
    return statistics.median(values) if values else None
