"""The latent-vs-pixel study's report: a markdown page with the tables, the budget and the command, a plot
of quality against sampling cost (one point per f) and a grid of samples, all written to ``docs/``."""

from __future__ import annotations

import datetime
import math
import os
import platform
import re
from pathlib import Path

import torch
from PIL import Image

from latentdiffusion.evaluation.latent_vs_pixel import IMAGES_DIR, Budget, StudyResults, model_config
from latentdiffusion.evaluation.plot import Panel, Point, scatter_plot
from latentdiffusion.files import atomic_write
from latentdiffusion.training.task import image_grid

PAGE, PLOT, SAMPLES = "latent-vs-pixel.md", "images/latent-vs-pixel.png", "images/latent-vs-pixel-samples.png"
GRID_COLUMNS = 8


def machine_description() -> str:
    """CPU model, core count, torch threads and version."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model
            )
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )


def described_threads(machine: str) -> int | None:
    """The torch thread count a ``machine_description`` line names (None where it names none)."""
    found = re.search(r"(\d+) torch threads?", machine)
    return int(found.group(1)) if found else None


def _giga(flops: float) -> str:
    return f"{flops / 1e9:,.1f}" if flops < 1e11 else f"{flops / 1e9:,.0f}"


def _percent(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---" if i == 0 else "---:" for i in range(len(header))]
    return "\n".join([_row(header), _row(align), *map(_row, rows)])


def first_stage_cells(results: StudyResults, f: int) -> list[str]:
    """Latent shape and reconstruction PSNR / SSIM of f's first stage."""
    if f == 1:
        return ["3x64x64 (pixels)", "exact (identity)"]
    ae = results.autoencoders[f]
    c, h, w = ae["latent"]
    return [f"{c}x{h}x{w}", f"{ae['psnr']:.2f} dB / {ae['ssim']:.3f}"]


def results_table(results: StudyResults) -> str:
    """One row per f (and one for real images): first stage, training under the budget, sampling cost,
    quality."""
    header = [
        "f", "latent", "first stage PSNR / SSIM", "U-Net params", "train GFLOP/step", "steps x batch",
        "train images/s", "U-Net GFLOP/step (cond+uncond)", "sampling GFLOP/image", "s/image",
        "adherence (all)", "single", "relational", "FD-shapes",
    ]  # fmt: skip
    rows = []
    for f in results.budget.factors:
        dm, ev = results.diffusion[f], results.evaluation[f]
        rows.append([
            str(f), *first_stage_cells(results, f), f"{dm['unet_parameters'] / 1e6:.2f} M",
            _giga(dm["flops_per_step"]), f"{dm['steps']} x {dm['batch_size']}", f"{dm['images_per_s']:.1f}",
            _giga(ev["unet_flops_per_step"]), _giga(ev["flops_per_image"]), f"{ev['seconds_per_image']:.2f}",
            _percent(ev["adherence"]["all"]), *_form_cells(ev), f"{ev['frechet_distance']:.2f}",
        ])  # fmt: skip
    data = results.data
    quality = [_percent(data["adherence"]["all"]), *_form_cells(data), f"{data['frechet_distance']:.2f}"]
    rows.append(["real images", *["-"] * (len(header) - 1 - len(quality)), *quality])
    return _table(header, rows)


def _form_cells(result: dict) -> list[str]:
    forms = result["adherence_by_form"]
    return [_percent(forms.get("single")), _percent(forms.get("relational"))]


def attributes_table(results: StudyResults) -> str:
    """Adherence per stated attribute (the checker's verdicts), one row per f."""
    keys = [k for k in results.data["adherence"] if k != "all"]
    rows = [
        [str(f), *(_percent(results.evaluation[f]["adherence"].get(k)) for k in keys)]
        for f in results.budget.factors
    ]
    rows.append(["real images", *(_percent(results.data["adherence"].get(k)) for k in keys)])
    return _table(["f", *keys], rows)


def costs_table(results: StudyResults) -> str:
    """Training FLOPs and wall-clock of every stage; the first stages and the classifier apart."""
    rows = []
    for f, ae in results.autoencoders.items():
        rows.append([f"first stage f={f}", f"{ae['steps']} x {ae['batch_size']}",
                     f"{ae['train_flops'] / 1e12:.1f}", _minutes(ae["train_seconds"])])  # fmt: skip
    clf = results.classifier
    rows.append(
        ["feature classifier", f"{clf['steps']} x {clf['batch_size']}", "-", _minutes(clf["train_seconds"])]
    )
    for f, dm in results.diffusion.items():
        rows.append([f"diffusion f={f}", f"{dm['steps']} x {dm['batch_size']}",
                     f"{dm['train_flops'] / 1e12:.1f}", _minutes(dm["train_seconds"])])  # fmt: skip
    for f, ev in results.evaluation.items():
        flops, seconds = ev["images"] * ev["flops_per_image"], ev["images"] * ev["seconds_per_image"]
        rows.append([f"sampling f={f}", f"{ev['images']} images", f"{flops / 1e12:.1f}", _minutes(seconds)])
    return _table(["stage", "steps x batch", "FLOPs (T)", "wall-clock (min)"], rows)


def total_minutes(results: StudyResults) -> float:
    """The sum of every stage's wall-clock in the sessions that ran it."""
    stages = [*results.autoencoders.values(), *results.diffusion.values(), *results.evaluation.values()]
    return sum(s.get("stage_seconds", 0.0) for s in [*stages, results.classifier, results.data]) / 60


# -------------------------------------------------------------------------------------------- images


def quality_panels(results: StudyResults) -> list[Panel]:
    """Adherence and FD-shapes against sampling GFLOP per image (log scale), one point per f, with the
    real images' scores as reference lines."""
    evaluations = [(f, results.evaluation[f]) for f in results.budget.factors]

    def points(key) -> tuple[Point, ...]:
        return tuple(
            Point(ev["flops_per_image"] / 1e9, key(ev), f"f={f} ({ev['seconds_per_image']:.2f} s)")
            for f, ev in evaluations
        )

    cost = "sampling cost: GFLOP per image (log scale; labels: s/image)"
    data = results.data
    adherence = Panel(
        "Prompt adherence (whole prompt), higher is better", cost, "adherence (%)",
        points(lambda ev: 100 * ev["adherence"]["all"]), log_x=True,
        references=((100 * data["adherence"]["all"], "real images"),), y_limits=(0.0, 100.0),
    )  # fmt: skip
    distance = Panel(
        "FD-shapes, lower is better", cost, "Frechet distance (classifier features)",
        points(lambda ev: ev["frechet_distance"]), log_x=True,
        references=((data["frechet_distance"], "real images"),),
    )  # fmt: skip
    return [adherence, distance]


def samples_grid(results: StudyResults, out: Path) -> Image.Image:
    """The first ``GRID_COLUMNS`` evaluation images of every f, one row per f (same prompts and seeds)."""
    rows = [
        sorted((out / f"evaluation-f{f}" / IMAGES_DIR).glob("*.png"))[:GRID_COLUMNS]
        for f in results.budget.factors
    ]
    side = 64
    blank = Image.new("RGB", (side, side), "white")
    cells = [
        image
        for paths in rows
        for image in [Image.open(p).convert("RGB").resize((side, side)) for p in paths]
        + [blank] * (GRID_COLUMNS - len(paths))
    ]
    return image_grid(cells, GRID_COLUMNS, background="white")


# ---------------------------------------------------------------------------------------------- page


def budget_text(budget: Budget) -> str:
    return (
        f"Budget `{budget.name}`: every diffusion model trains for "
        f"**{budget.diffusion_flops / 1e12:g} TFLOP** "
        f"(the FLOPs of one training step, counted by `torch.utils.flop_counter` on forward and backward of "
        f"U-Net and text encoder plus the frozen encoder's forward, times the steps; the optimiser update is "
        f"not counted), batch {budget.diffusion_batch}, so steps = floor(budget / FLOPs per step). First "
        f"stages: {budget.autoencoder_steps} steps x {budget.autoencoder_batch} each. Feature classifier: "
        f"{budget.classifier_steps} steps x {budget.classifier_batch}. Evaluation: {budget.eval_prompts} "
        f"prompts per caption form, {budget.sampler} with {budget.sampling_steps} steps, guidance "
        f"{budget.guidance_scale:g}, Frechet distance against {budget.reference_images} real images."
    )


def setup_text(budget: Budget) -> str:
    levels = ", ".join(f"f = {f}: {len(model_config(budget, f).unet.channel_mult)}" for f in budget.factors)
    low, attention = budget.lowest_side, f"{2 * budget.lowest_side}x{2 * budget.lowest_side}"
    return f"""- Data: the procedural shapes world at 64x64 (`training/shapes.py`), fresh items every step.
- First stages: f = 1 is pixel space (the identity, `AutoencoderConfig(identity=True)`: the diffusion
  model sees the image in [-1, 1], 3 channels); f = 2, 4, 8 are KL autoencoders of the shapes family
  (widths {budget.autoencoder_widths[0]} then {budget.autoencoder_widths[1]} per level, one level per factor
  of 2, 4 latent channels), trained by `ldm train-autoencoder`'s task with L1 + KL only (no PatchGAN, no
  LPIPS: the paper uses both), latents scaled to unit variance.
- Diffusion: the `shapes` preset (U-Net and CLIP-architecture text encoder trained jointly from scratch,
  eps target, min-SNR 5, offset noise 0.05, EMA), one U-Net family for every f: width
  {budget.model_channels}, channel_mult (1, 2, 2, ...) with as many levels as take the latent down to
  {low}x{low}, attention on the two lowest levels ({attention} and {low}x{low}), so larger inputs get more
  levels ({levels}).
- Quality: prompt adherence is the share of prompts whose every stated attribute the shapes checker
  (`evaluation/shapes_checker.py`, plain image analysis) confirms; FD-shapes is the Frechet distance
  between Gaussians fitted to the penultimate-layer features of a small CNN trained here to predict scene
  attributes (`evaluation/frechet.py`). It is not comparable to published FID values. The "real images"
  row scores rendered images of the same prompts: the checker's ceiling and the distance's floor at this
  sample size."""


def report_markdown(results: StudyResults, command: str) -> str:
    """The whole page."""
    accuracy = ", ".join(f"{k} {100 * v:.0f}%" for k, v in results.classifier["accuracy"].items())
    date = datetime.date.today().isoformat()
    return f"""# Latent vs pixel space on the shapes world

Rombach et al. 2022 (Sec. 4.1, Fig. 6 and 7) report that diffusion in the latent space of a perceptual
autoencoder instead of on pixels cuts training and sampling cost by one to two orders of magnitude at equal
quality, with downsampling factors f = 4..16 the best trade-off. This page measures that trade-off with
this project's own code, under one equal training budget for every f.

Produced by `{command}` on {date}; machine: {machine_description()}; whole study
{total_minutes(results):.0f} min of wall-clock (sum of the stages, in the sessions that ran them).

{budget_text(results.budget)}

## Results

{results_table(results)}

Adherence per attribute:

{attributes_table(results)}

![quality against sampling cost](images/latent-vs-pixel.png)

Samples (rows f = {", ".join(str(f) for f in results.budget.factors)}; the first {GRID_COLUMNS} evaluation
prompts, same seeds):

![samples](images/latent-vs-pixel-samples.png)

## Costs

{costs_table(results)}

## Setup

{setup_text(results.budget)}

Feature classifier accuracy on unseen images: {accuracy}.

{CONCLUSIONS_HEADING}

{PLACEHOLDER_CONCLUSIONS}
"""


CONCLUSIONS_HEADING = "## Conclusions"
PLACEHOLDER_CONCLUSIONS = (
    "_To be written after the real run: where these numbers agree with the paper's trend "
    "and where they do not._"
)


def keep_conclusions(page: str, previous: str | None) -> str:
    """``page`` with the previous page's hand-written conclusions, so re-running the study keeps them."""
    if previous is None or CONCLUSIONS_HEADING not in previous:
        return page
    written = previous.split(CONCLUSIONS_HEADING, 1)[1]
    return page.split(CONCLUSIONS_HEADING, 1)[0] + CONCLUSIONS_HEADING + written


# The compute curves' section (latent_vs_pixel_curves_report) lives between these markers, before the
# conclusions; each report rewrites its own part of the page and keeps the other's.
CURVES_START, CURVES_END = "<!-- compute curves: start -->", "<!-- compute curves: end -->"


def curves_block(page: str | None) -> str | None:
    """The curves' section of ``page`` (markers included), if it has one."""
    if page is None or CURVES_START not in page or CURVES_END not in page:
        return None
    start = page.index(CURVES_START)
    return page[start : page.index(CURVES_END, start) + len(CURVES_END)]


def with_curves_block(page: str, block: str | None) -> str:
    """``page`` with ``block`` in place of its curves' section, or inserted before the conclusions."""
    if block is None:
        return page
    old = curves_block(page)
    if old is not None:
        return page.replace(old, block)
    head, tail = page.split(CONCLUSIONS_HEADING, 1) if CONCLUSIONS_HEADING in page else (page, None)
    joined = head.rstrip("\n") + "\n\n" + block + "\n\n"
    return joined if tail is None else joined + CONCLUSIONS_HEADING + tail


def write_report(results: StudyResults, out: Path, docs: Path, command: str) -> list[Path]:
    """Write the page, the plot and the sample grid under ``docs``; returns their paths."""
    paths = [docs / PAGE, docs / PLOT, docs / SAMPLES]
    previous = paths[0].read_text() if paths[0].is_file() else None
    page = keep_conclusions(report_markdown(results, command), previous)
    page = with_curves_block(page, curves_block(previous))
    atomic_write(paths[0], lambda tmp: Path(tmp).write_text(page))
    for path, image in (
        (paths[1], scatter_plot(quality_panels(results))),
        (paths[2], samples_grid(results, out)),
    ):
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
    return paths
