"""Recipe probes on the compute curves: one f's diffusion model trained on a curve's step grid with a
changed recipe (config overrides) and/or another first stage, scored as the curves score
(``benchmarks/latent_vs_pixel_probe.py`` runs them).

A probe's record is a curve's results file whose settings also name the probe's changes; its points sit on
the curve's step grid, so their ``flops`` are the curve architecture's. A change that alters the network
(cross-attention at more levels, say) costs other FLOPs a step: the record keeps the probe's own count
(``own_flops_per_step``), and ``own_points`` restates the points in it, which is what the report's probe
table measures targets in. Committed copies of finished probes' records live in ``PROBES_DIR`` under the
curves' results folder, where the report finds them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from latentdiffusion.errors import UserError
from latentdiffusion.evaluation import latent_vs_pixel as lvp
from latentdiffusion.evaluation import latent_vs_pixel_curves as curves

PROBES_DIR = "probes"
OWN_FLOPS = "probe_flops_per_step"  # the record's key for the probe architecture's training FLOPs a step


def probe_settings(budget: curves.CurveBudget, f: int, first_stage: str | None, overrides: dict) -> dict:
    return curves.settings(budget, f) | {"probe": {"first_stage": first_stage, "overrides": overrides}}


def open_probe(path: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The probe's record so far (a new one where ``path`` does not exist); another probe's is refused."""
    saved = curves.read_results(path)
    if saved is None:
        return curves.new_results(settings)
    if saved["settings"] != settings:
        raise UserError(f"{path} holds another probe ({saved['settings'].get('probe')}); pass another --out")
    return saved


def own_flops_per_step(
    budget: curves.CurveBudget, f: int, first_stage: str | None, overrides: dict[str, Any]
) -> int:
    """Training FLOPs of one step of the probe's own recipe: its overrides, and the encoder of its first
    stage (a model folder; None: the study's architecture), counted as the curves count theirs."""
    config = curves.diffusion_config(budget, f, None, 1, overrides)
    if first_stage is not None:
        from latentdiffusion.pipelines.loading import load_components

        encoder = load_components(first_stage).config.autoencoder
        config = replace(config, model=replace(config.model, autoencoder=encoder))
    return lvp.train_step_flops(config)


def with_own_flops(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with the probe's own FLOPs a step (counted once, then kept)."""
    if OWN_FLOPS in record:
        return record
    settings = record["settings"]
    budget = curves.get_curve_budget(settings["budget"]["name"])
    probe = settings["probe"]
    return record | {
        OWN_FLOPS: own_flops_per_step(budget, settings["f"], probe["first_stage"], probe["overrides"])
    }


def own_points(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The probe's points with ``flops`` in its own FLOPs (the grid's where the record lacks its count)."""
    grid = (record.get("diffusion") or {}).get("flops_per_step")
    own = record.get(OWN_FLOPS)
    scale = own / grid if own and grid else 1.0
    return [p | {"flops": p["flops"] * scale} for p in record["points"]]


def describe(record: dict[str, Any]) -> str:
    """The probe's changes to its curve, as the command line names them."""
    probe = record["settings"]["probe"]
    parts = [f"{key}={value}" for key, value in probe["overrides"].items()]
    if probe["first_stage"]:
        parts.append(f"first stage {probe['first_stage']}")
    return ", ".join(f"`{part}`" for part in parts) or "none (a control)"


def load_probes(budget: curves.CurveBudget, folder: Path) -> dict[str, dict[str, Any]]:
    """The probe records in ``folder`` (name: record) measured under ``budget``, in name order."""
    found = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = curves.read_results(path)
        settings = dict((record or {}).get("settings") or {})
        if settings.pop("probe", None) is None or "f" not in settings:
            continue  # not a probe's record
        if settings == curves.settings(budget, settings["f"]):
            found[path.stem] = record
    return found
