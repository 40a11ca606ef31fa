"""The compute curves' part of ``docs/latent-vs-pixel.md``: quality against training FLOPs per f (a PNG),
the training FLOPs and sampling seconds each f needs to reach fixed quality targets, and the ratio of
pixel space to the best latent space at each target (Rombach et al. 2022, Sec. 4.1, Fig. 6-7)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from latentdiffusion.evaluation.latent_vs_pixel_curves import SECOND_GUIDANCE, Curves, cpu_seconds_per_image
from latentdiffusion.evaluation.latent_vs_pixel_probes import OWN_FLOPS, describe, own_points
from latentdiffusion.evaluation.latent_vs_pixel_report import (
    CURVES_END,
    CURVES_START,
    PAGE,
    _percent,
    _table,
    described_threads,
    with_curves_block,
)
from latentdiffusion.evaluation.plot import Panel, Series, scatter_plot
from latentdiffusion.files import atomic_write

CURVES_PLOT = "images/latent-vs-pixel-curves.png"
ADHERENCE_TARGETS = (0.25, 0.5, 0.75)  # whole-prompt adherence on single-object prompts
FD_TARGETS = (4.0, 2.0)  # FD-shapes at most this many times the real images' (the floor at this sample size)
# Single attributes the single-object curves learn one after another (f = 4: colour by 178 T, position by
# 562 T, shape last): equal-quality points that pixel space can reach within a budget this machine affords.
ATTRIBUTE_TARGETS = (("colour", 0.75), ("position", 0.75))


def _tera(flops: float) -> str:
    return f"{flops / 1e12:,.1f}" if flops < 1e14 else f"{flops / 1e12:,.0f}"


# ------------------------------------------------------------------------------------------ targets


def targets(curves: Curves) -> list[tuple[str, str, float]]:
    """(label, measure, threshold): whole-prompt adherence and single attributes at least, FD-shapes at
    most (multiples of the floor). A measure is "adherence", "fd" or an attribute's name."""
    found = [(f"adherence >= {100 * t:.0f}%", "adherence", t) for t in ADHERENCE_TARGETS]
    found += [(f"{name} >= {100 * t:.0f}%", name, t) for name, t in ATTRIBUTE_TARGETS]
    if curves.data is not None:
        floor = curves.data["frechet_distance"]
        found += [(f"FD <= {m:g}x real ({m * floor:.0f})", "fd", m * floor) for m in FD_TARGETS]
    return found


def at_better_guidance(
    point: dict[str, Any], score: Callable[[dict[str, Any]], float | None]
) -> float | None:
    """The better of a checkpoint's scores at the guidances it was sampled at (its own and, where sampled,
    the second); None where neither has that score (an attribute no prompt asked for)."""
    found = [
        v for scores in (point, point.get("second_guidance")) if scores and (v := score(scores)) is not None
    ]
    return max(found, default=None)


def best_adherence(point: dict[str, Any]) -> float:
    """A checkpoint's adherence at the better of the guidances it was sampled at."""
    return at_better_guidance(point, lambda scores: scores["adherence"])


def measured(point: dict[str, Any], key: str) -> float | None:
    """A checkpoint's value of a target's measure: FD-shapes at the curves' guidance, adherence and
    attributes at the better guidance."""
    if key == "fd":
        return point["fd"]
    if key == "adherence":
        return best_adherence(point)
    return at_better_guidance(point, lambda scores: (scores.get("attributes") or {}).get(key))


def reached(points: list[dict[str, Any]], key: str, threshold: float) -> dict[str, Any] | None:
    """The first checkpoint (fewest FLOPs) whose measure ``key`` meets the target; FD counts down, the
    rest up."""
    for point in sorted(points, key=lambda p: p["flops"]):
        value = measured(point, key)
        if value is not None and (value <= threshold if key == "fd" else value >= threshold):
            return point
    return None


def trained_flops(stage: dict[str, Any]) -> float:
    return max((p["flops"] for p in stage["points"]), default=0.0)


def trained_cell(stage: dict[str, Any]) -> str:
    count = len(stage["points"])
    return f"{_tera(trained_flops(stage))} T, {count} point{'' if count == 1 else 's'}"


def reach_cell(stage: dict[str, Any], key: str, threshold: float) -> str:
    if not stage["points"]:
        return "-"
    point = reached(stage["points"], key, threshold)
    if point is None:
        return f"not reached (<= {_tera(trained_flops(stage))} T trained)"
    return f"{_tera(point['flops'])} T"


# ------------------------------------------------------------------------------------------- tables


def one_budget_column(page: str | None) -> dict[int, str]:
    """Single-object adherence and FD-shapes per f from the one-budget study's results table on the page
    (the table that study writes), so the earlier measurement stands beside the curves."""
    if page is None or "## Results" not in page:
        return {}
    section = page.split("## Results", 1)[1].lstrip("\n")
    lines = section.split("\n\n", 1)[0].splitlines()  # the first table after the heading
    if len(lines) < 3 or not all(line.startswith("|") for line in lines):
        return {}
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    if not {"f", "single", "FD-shapes"} <= set(header):
        return {}
    column = {}
    for line in lines[2:]:
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=False))
        if cells["f"].isdigit():
            column[int(cells["f"])] = f"{cells['single']} / {cells['FD-shapes']}"
    return column


def first_stage_cells(stage: dict[str, Any]) -> list[str]:
    """Latent shape, reconstruction and cost of f's first stage (f = 1: pixels, nothing to train)."""
    ae = stage.get("first_stage")
    if stage["settings"]["f"] == 1:
        return ["3x64x64 (pixels)", "exact (identity)", "-"]
    if ae is None:
        return ["-", "-", "-"]
    c, h, w = ae["latent"]
    state = "converged" if ae["converged"] else "training"
    quality = f"{ae['psnr']:.2f} dB / {ae['ssim']:.3f} ({state})"
    return [f"{c}x{h}x{w}", quality, f"{ae['steps']} x {ae['batch_size']}, {_tera(ae['train_flops'])} T"]


def ceiling_cell(stage: dict[str, Any], data: dict[str, Any] | None) -> str:
    """Adherence / FD-shapes of the curve prompts' real images after f's first stage (f = 1: the real
    images themselves): what f's diffusion model could reach at most."""
    if stage["settings"]["f"] == 1:
        scores = data and {"adherence": data["adherence_by_form"]["single"], "fd": data["frechet_distance"]}
    else:
        scores = (stage.get("first_stage") or {}).get("reconstruction")
    return "-" if not scores else f"{_percent(scores['adherence'])} / {scores['fd']:.0f}"


def compute_table(curves: Curves, one_budget: dict[int, str]) -> str:
    """One row per f: first stage, training so far, sampling cost, FLOPs to each target, one-budget column."""
    goals = targets(curves)
    header = ["f", "latent", "first stage PSNR / SSIM", "first stage steps x batch, FLOPs"]
    header += ["reconstructions: adherence / FD", "trained"]
    header += ["CPU s/image", *(label for label, _, _ in goals), "one budget (40 TFLOP): single / FD"]
    rows = []
    for f, stage in sorted(curves.stages.items()):
        seconds = cpu_seconds_per_image(stage)
        trained = trained_cell(stage)
        reach = [reach_cell(stage, key, threshold) for _, key, threshold in goals]
        timing = "-" if seconds is None else f"{seconds:.2f}"
        ceiling = ceiling_cell(stage, curves.data)
        rows.append(
            [str(f), *first_stage_cells(stage), ceiling, trained, timing, *reach, one_budget.get(f, "-")]
        )
    return _table(header, rows)


def recipes(curves: Curves, with_probes: bool) -> dict[int, list[dict[str, Any]]]:
    """Every measured recipe per f: its curve and (``with_probes``) its probes, their points in their own
    FLOPs and their name under "probe"."""
    found = {f: [stage] for f, stage in curves.stages.items()}
    for name, record in curves.probes.items() if with_probes else ():
        found.setdefault(record["settings"]["f"], []).append(probe_stage(name, record))
    return found


def probe_stage(name: str, record: dict[str, Any]) -> dict[str, Any]:
    """A probe as the tables measure a curve: its points in its own FLOPs, its name under "probe"."""
    return {"points": own_points(record), "probe": name}


def first_reach(stages: list[dict[str, Any]], key: str, threshold: float) -> tuple[dict, dict] | None:
    """(checkpoint, its stage): of these recipes, the checkpoint that met the target with fewest FLOPs."""
    found = [(p, stage) for stage in stages if (p := reached(stage["points"], key, threshold)) is not None]
    return min(found, key=lambda hit: hit[0]["flops"], default=None)


def _named(stage: dict[str, Any]) -> str:
    return f" ({stage['probe']})" if "probe" in stage else ""


def ratio_row(curves: Curves, key: str, threshold: float, with_probes: bool = False) -> list[str]:
    """The best latent f (fewest FLOPs to the target) against pixel space: FLOPs, training and sampling
    ratios; where pixel space has not reached the target, the ratio is a lower bound (">=", from the
    recipe trained least). ``with_probes``: each f's best of its curve and its probes."""
    measured = recipes(curves, with_probes)
    latent = {
        f: hit for f, stages in measured.items() if f > 1 and (hit := first_reach(stages, key, threshold))
    }
    if not latent:
        return ["not reached", "-", "-", "-"]
    best = min(latent, key=lambda f: latent[f][0]["flops"])
    point, stage = latent[best]
    flops = point["flops"]
    cells = [f"f={best}{_named(stage)}: {_tera(flops)} T"]
    pixel = [found for found in measured.get(1, []) if found["points"]]
    if not pixel:
        return [*cells, "not run", "-", "-"]
    hit = first_reach(pixel, key, threshold)
    if hit is not None:
        sampling = _ratio(cpu_seconds_per_image(hit[1]), cpu_seconds_per_image(stage))
        pixel_flops = hit[0]["flops"]
        return [*cells, f"{_tera(pixel_flops)} T{_named(hit[1])}", f"{pixel_flops / flops:.1f}x", sampling]
    cheapest = min(cpu_seconds_per_image(found) for found in pixel)
    sampling = _ratio(cheapest, cpu_seconds_per_image(stage))
    trained = min(trained_flops(found) for found in pixel)
    bound = f">= {trained / flops:.1f}x" if round(trained / flops, 1) > 1 else "-"  # no ">= 1.0x"
    return [*cells, f"not reached (<= {_tera(trained)} T trained)", bound, sampling]


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.1f}x"


def ratio_table(curves: Curves, with_probes: bool = False) -> str:
    header = [
        "target",
        "best latent f: FLOPs",
        "pixel space (f = 1): FLOPs",
        "training ratio",
        "sampling CPU-time ratio",
    ]
    goals = targets(curves)
    rows = [[label, *ratio_row(curves, key, threshold, with_probes)] for label, key, threshold in goals]
    return _table(header, rows)


def probe_table(curves: Curves) -> str:
    """One row per committed probe: its changes, its training FLOPs a step against its curve's, and the
    FLOPs of its own it took to reach each target."""
    goals = targets(curves)
    header = ["probe", "f", "changes", "GFLOP a step (the curve's)", "trained"]
    header += [label for label, _, _ in goals]
    rows = []
    for name, record in curves.probes.items():
        stage = probe_stage(name, record)
        grid, own = (record.get("diffusion") or {}).get("flops_per_step"), record.get(OWN_FLOPS)
        cost = f"{own / 1e9:.1f} ({grid / 1e9:.1f})" if own and grid else "-"
        reach = [reach_cell(stage, key, threshold) for _, key, threshold in goals]
        rows.append([name, str(record["settings"]["f"]), describe(record), cost, trained_cell(stage), *reach])
    return _table(header, rows)


def probes_text(curves: Curves) -> str:
    if not curves.probes:
        return ""
    return f"""
Recipe probes (`benchmarks/latent_vs_pixel_probe.py`; their records under `probes/` beside the curves'):
a curve's grid, prompts and scoring with one change each, targets in the probe's own training FLOPs (a
network with more attention costs more a step); one seed each:

{probe_table(curves)}

Pixel space against the best latent space again, each f's best of its curve and its probes (the recipe
that reached a target first is named; where pixel space reached none, the bound comes from its recipe
trained least):

{ratio_table(curves, with_probes=True)}
"""


def points_table(curves: Curves) -> str:
    """Every measured checkpoint; the second guidance's adherence where it was sampled."""
    guidance = curves.budget.study.guidance_scale
    header = ["f", "step", "TFLOP", "images seen", f"adherence (guidance {guidance:g})"]
    header += [f"adherence ({SECOND_GUIDANCE:g})", "FD-shapes", "train min", "s/image", "CPU s/image"]
    rows = [point_cells(f, p) for f, stage in sorted(curves.stages.items()) for p in stage["points"]]
    return _table(header, rows)


def point_cells(f: int, p: dict[str, Any]) -> list[str]:
    second = _percent(p["second_guidance"]["adherence"]) if "second_guidance" in p else "-"
    return [
        str(f), str(p["step"]), _tera(p["flops"]), str(p["images"]), _percent(p["adherence"]), second,
        f"{p['fd']:.1f}", f"{p['train_seconds'] / 60:.1f}", f"{p['seconds_per_image']:.2f}",
        f"{p['cpu_seconds_per_image']:.2f}",
    ]  # fmt: skip


def checkpoint_sampling_seconds(stage: dict[str, Any], prompts: int) -> float:
    """Wall-clock of sampling every checkpoint's images (``prompts`` at the curves' guidance, as many
    again where the second guidance was sampled), from the points' seconds an image."""
    return sum(
        p["seconds_per_image"] * prompts * (2 if "second_guidance" in p else 1) for p in stage["points"]
    )


def torch_threads(stage: dict[str, Any]) -> str:
    """The torch thread counts the checkpoints were trained and scored with (from their machine line)."""
    found = {described_threads(p.get("machine", "")) for p in stage["points"]} - {None}
    return ", ".join(str(n) for n in sorted(found)) or "-"


def time_table(curves: Curves) -> str:
    """Training and sampling wall-clock per f and in all, from the results files (the study's time)."""
    header = ["f", "first stage: training min", "diffusion: training min", "checkpoints: sampling min"]
    header += ["torch threads", "hours"]
    rows, total = [], 0.0
    for f, stage in sorted(curves.stages.items()):
        first = (stage.get("first_stage") or {}).get("train_seconds", 0.0)
        diffusion = max((p["train_seconds"] for p in stage["points"]), default=0.0)
        sampling = checkpoint_sampling_seconds(stage, curves.budget.prompts)
        seconds = first + diffusion + sampling
        total += seconds
        trained_first = "-" if f == 1 else f"{first / 60:.0f}"  # pixel space has no first stage
        cells = [trained_first, f"{diffusion / 60:.0f}", f"{sampling / 60:.0f}"]
        rows.append([str(f), *cells, torch_threads(stage), f"{seconds / 3600:.1f}"])
    rows.append(["all", "", "", "", "", f"**{total / 3600:.1f}**"])
    return _table(header, rows)


# --------------------------------------------------------------------------------------------- plot


def curve_panels(curves: Curves) -> list[Panel]:
    """FD-shapes and adherence against training TFLOP (log scale), one curve per f; adherence also at
    the second guidance, one more curve per f that was sampled at it."""

    def series(key: str, scale: float) -> tuple[Series, ...]:
        return tuple(
            Series(f"f={f}", tuple((p["flops"] / 1e12, scale * p[key]) for p in stage["points"]))
            for f, stage in sorted(curves.stages.items())
            if stage["points"]
        )

    def second_guidance() -> tuple[Series, ...]:
        found = []
        for f, stage in sorted(curves.stages.items()):
            points = [(p["flops"] / 1e12, 100.0 * p["second_guidance"]["adherence"])
                      for p in stage["points"] if "second_guidance" in p]  # fmt: skip
            if points:
                found.append(Series(f"f={f}, guidance {SECOND_GUIDANCE:g}", tuple(points)))
        return tuple(found)

    x_label = "diffusion training TFLOP (log scale)"
    data = curves.data or {}
    floor = ((data["frechet_distance"], "real images"),) if data else ()
    ceiling = ((100 * data["adherence_by_form"]["single"], "real images"),) if data else ()
    distance = Panel(
        "FD-shapes, lower is better", x_label, "Frechet distance (log scale)", (), log_x=True,
        references=floor, series=series("fd", 1.0), legend_right=True, log_y=True,
    )  # fmt: skip
    adherence = Panel(
        "Adherence (single-object prompts), higher is better", x_label, "adherence (%)", (), log_x=True,
        references=ceiling, y_limits=(0.0, 100.0), series=series("adherence", 100.0) + second_guidance(),
    )  # fmt: skip
    return [distance, adherence, *probe_panels(curves, x_label)]


def probe_panels(curves: Curves, x_label: str) -> list[Panel]:
    """With probes: the named colour (the first attribute target) of every curve and probe, the probes
    in their own FLOPs, at the better guidance of each checkpoint."""
    if not curves.probes:
        return []
    named = [(f"f={f}", stage["points"]) for f, stage in sorted(curves.stages.items())]
    named += [(name, own_points(record)) for name, record in curves.probes.items()]
    series = tuple(
        Series(
            label,
            tuple((p["flops"] / 1e12, 100.0 * v) for p in points if (v := measured(p, "colour")) is not None),
        )
        for label, points in named
        if points
    )
    title = "Named colour: curves and probes (own FLOPs)"
    return [Panel(title, x_label, "colour right (%)", (), log_x=True, y_limits=(0.0, 100.0), series=series)]


# --------------------------------------------------------------------------------------------- page


def setup_text(curves: Curves) -> str:
    budget, base = curves.budget, curves.budget.study
    text = (
        f"Budget `{budget.name}`: checkpoints at {budget.first_flops / 1e12:g} TFLOP x "
        f"10^(k/{budget.points_per_decade}) of diffusion training (the same grid for every f); at each, "
        f"{budget.prompts} single-object prompts (the one-budget study's first ones, seed i for prompt "
        f"i), {base.sampler} with {base.sampling_steps} steps, guidance {base.guidance_scale:g} (and "
        f"again at {SECOND_GUIDANCE:g}, the default model's best: adherence targets count the better "
        f"of the two where both were sampled), FD-shapes against {base.reference_images} real images. "
        "Besides whole-prompt adherence, two single attributes are targets (the share of the prompts "
        "naming a colour, a position, whose picture shows it): a model learns them one after another, "
        "so they mark equal quality earlier in training than the whole prompt does."
    )
    if curves.data is not None:
        fd, adherence = curves.data["frechet_distance"], curves.data["adherence_by_form"]["single"]
        text += (
            f" Real images of the same prompts score FD-shapes {fd:.1f} (the floor at this sample size) "
            f"and adherence {_percent(adherence)}."
        )
    scenes = (
        "single-object scenes only"
        if budget.relational_fraction == 0
        else f"the preset's scene mix ({budget.relational_fraction:.0%} of scenes with two objects)"
    )
    return text + (
        " Recipe: the `shapes` preset's (v target, zero terminal SNR, timesteps shifted to high noise, "
        f"coordinate channels, text encoder without causal mask) on {scenes}, batch {base.diffusion_batch}, "
        f"constant learning rate after {budget.warmup_steps} warm-up steps. First stages: L1 + KL, rounds of "
        f"{budget.autoencoder_round} steps x {base.autoencoder_batch} until held-out PSNR gains less than "
        f"{budget.autoencoder_min_gain:g} dB per round."
    )


def curves_markdown(curves: Curves, command: str, one_budget: dict[int, str]) -> str:
    """The curves' section of the page, between its markers."""
    head = f"""{CURVES_START}
## Quality against training compute

Written by `{command}` from the results files; the curves grow as the stages continue.
{setup_text(curves)}
"""
    if not curves.stages:
        return head + f"\nNo stage has been run yet (the plan below says which to run).\n{CURVES_END}"
    return (
        head
        + f"""
![quality against training compute](images/latent-vs-pixel-curves.png)

Training FLOPs each f needs to reach a quality (the first checkpoint that does), with its first stage and
sampling cost (CPU seconds an image, the median over its checkpoints: CPU time, so that checkpoints
sampled on one thread and on two compare); "reconstructions" scores the curve prompts' real images encoded
and decoded by the first stage, the most its diffusion model could reach; the last column is the
one-budget study above (an earlier recipe: eps target, causal text encoder, no coordinate channels,
guidance 5):

{compute_table(curves, one_budget)}

Pixel space against the best latent space at each target (the paper's claim is 10-100x):

{ratio_table(curves)}
{probes_text(curves)}
Every checkpoint:

{points_table(curves)}

Time these curves took, from the same files (training from the runs' throughput logs; sampling from the
checkpoints' seconds an image; scoring, loading and idle time not counted):

{time_table(curves)}
{CURVES_END}"""
    )


def write_curves_report(curves: Curves, docs: Path, command: str) -> list[Path]:
    """Rewrite the curves' section of the page (the rest is kept) and the curves' PNG; returns the paths."""
    page_path, plot_path = docs / PAGE, docs / CURVES_PLOT
    previous = page_path.read_text() if page_path.is_file() else "# Latent vs pixel space\n"
    block = curves_markdown(curves, command, one_budget_column(previous))
    page = with_curves_block(previous, block)
    atomic_write(page_path, lambda tmp: Path(tmp).write_text(page))
    if not curves.stages:
        return [page_path]
    image = scatter_plot(curve_panels(curves))
    atomic_write(plot_path, lambda tmp: image.save(tmp, format="PNG"))
    return [page_path, plot_path]
