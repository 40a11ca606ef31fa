"""A recipe probe on the latent-vs-pixel compute curves: one f's diffusion model trained on the curves' grid
with a changed recipe and/or another first stage, scored as the curves score, beside the committed curve.

    python benchmarks/latent_vs_pixel_probe.py --f 4 --first-stage default \\
        --set diffusion.timestep_shift=1 --until 1.78e14 --out runs/probes/shift1

``--first-stage`` takes a model folder whose autoencoder the diffusion model trains on, frozen ("default":
the shipped model's), instead of training the study's; ``--set KEY=VALUE`` (repeatable) changes the
training config as ``ldm train --KEY=VALUE`` does. The probe's record (``--out``/fF.json: the curves'
settings plus the probe's changes, and one line of scores per checkpoint) is continued when the same
command runs again; another probe needs another ``--out``. The step grid is the committed curve's (the study
architecture's FLOPs per step), so the probe's points line up step for step with the curve's in
``--results``, which the printed table sets beside them; the feature classifier comes from there too.
The record also keeps the probe's own training FLOPs a step. With ``--name NAME`` the record is also
written to ``--results``/probes/NAME.json, where the curves' report reads it (``--stage report``: a table
of the probes, targets in their own FLOPs, and a ratio table with each f's best recipe).

``--score MODEL`` instead samples and scores a finished model (a folder, or "default": the shipped model) on
the curves' prompts exactly as a curve checkpoint is scored, at the curves' guidance or ``--guidance``;
its images go under --out (replaced by the next score of the same model and guidance):

    python benchmarks/latent_vs_pixel_probe.py --score default --guidance 1.5 --out runs/probes/score-default
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from latentdiffusion.cli.bench import flops
from latentdiffusion.errors import UserError
from latentdiffusion.evaluation import latent_vs_pixel_curves as curves
from latentdiffusion.evaluation import latent_vs_pixel_probes as probes

COLUMNS = ("all", "shape", "position", "colour", "count")


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE (a training config key), not {pair!r}")
        overrides[key] = value
    return overrides


def run_probe(args: argparse.Namespace, log=print) -> dict[str, Any]:
    budget = curves.get_curve_budget(args.budget)
    overrides = parse_overrides(args.set)
    if args.f == 1 and args.first_stage:
        raise UserError("pixel space (f = 1) has no first stage to replace")
    curves.diffusion_config(budget, args.f, None, 1, overrides)  # refuse a bad key before any work
    judge = curves.load_judge(budget, args.results)
    path = args.out / f"f{args.f}.json"
    record = probes.open_probe(path, probes.probe_settings(budget, args.f, args.first_stage, overrides))
    record = curves.write_results(path, probes.with_own_flops(record))
    autoencoder = args.first_stage
    if args.f > 1 and autoencoder is None:  # the study's own first stage, as the curve's
        record = curves.recorded_first_stage(budget, args.f, args.out, path, record, judge, log)
        autoencoder = record["first_stage"]["export"]
    return curves.diffusion_curve(
        budget, args.f, args.until, args.out, path, record, autoencoder, judge, log, overrides
    )


def score_model(args: argparse.Namespace) -> dict[str, Any]:
    """The curves' scores of a finished model, sampled at ``args.guidance`` (None: the curves' own)."""
    budget = curves.get_curve_budget(args.budget)
    if args.guidance is not None:
        budget = curves.with_guidance(budget, args.guidance)
    guidance = budget.study.guidance_scale
    folder = args.out / f"score-{Path(args.score).name}-guidance-{guidance:g}"
    shutil.rmtree(folder, ignore_errors=True)  # sample afresh: the model may have changed since
    point = curves.score_checkpoint(budget, args.score, folder, *curves.load_judge(budget, args.results))
    return {"model": args.score, "guidance": guidance, **point}


def scores(point: dict[str, Any] | None) -> list[str]:
    if point is None:
        return ["-"] * (len(COLUMNS) + 1)
    values = {"all": point["adherence"], **point["attributes"]}
    return [f"{100 * values[k]:.0f}%" for k in COLUMNS] + [f"{point['fd']:.0f}"]


def comparison_table(probe: dict[str, Any], curve: dict[str, Any] | None) -> str:
    """The probe's points beside the committed curve's at the same steps."""
    theirs = {p["step"]: p for p in (curve or {}).get("points", [])}
    names = [*COLUMNS, "FD"]
    head = ["step", "TFLOP", *(f"probe {n}" for n in names), *(f"curve {n}" for n in names)]
    lines = ["| " + " | ".join(head) + " |", "|" + " ---: |" * len(head)]
    for p in probe["points"]:
        cells = [str(p["step"]), f"{p['flops'] / 1e12:.0f}", *scores(p), *scores(theirs.get(p["step"]))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--f", type=int, choices=(1, 2, 4, 8), help="downsampling factor")
    parser.add_argument("--until", type=flops, help="training FLOPs of the last checkpoint")
    parser.add_argument("--out", type=Path, required=True, help="the probe's run folders and record")
    parser.add_argument("--first-stage", help="a model folder whose autoencoder to train on ('default')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config change")
    parser.add_argument("--budget", default="default", help="the curves' budget ('default' or 'toy')")
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/latent-vs-pixel"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--name", help="also write the record to --results/probes/NAME.json (the report's)")
    parser.add_argument("--quiet", action="store_true", help="print no progress lines")
    parser.add_argument(
        "--score", metavar="MODEL", help="score a finished model instead (folder or 'default')"
    )
    parser.add_argument("--guidance", type=float, help="--score's guidance scale (default: the curves')")
    args = parser.parse_args(argv)
    if args.score is None and (args.f is None or args.until is None):
        parser.error("a probe needs --f and --until (or --score MODEL)")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.score is not None:
            print(json.dumps(score_model(args), indent=1))
            return 0
        record = run_probe(args, log=(lambda _: None) if args.quiet else print)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.name:  # the committed copy the curves' report reads
        curves.write_results(args.results / probes.PROBES_DIR / f"{args.name}.json", record)
    print(comparison_table(record, curves.read_results(args.results / f"f{args.f}.json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
