"""Latent vs pixel space (Rombach et al. 2022, Sec. 4.1): train and evaluate diffusion models at
downsampling factors f = 1 (pixels), 2, 4, 8 on the shapes world.

One budget (the default): every f trains under one equal budget in FLOPs; writes docs/latent-vs-pixel.md
with the tables plus docs/images/latent-vs-pixel.png (quality against sampling cost, one point per f).

    python benchmarks/latent_vs_pixel.py [--budget default|toy] [--out runs/latent-vs-pixel] [--docs docs]

The same as ``ldm bench latent-vs-pixel``. Re-running continues the study: finished stages (their
result.json exists) are skipped, an interrupted training resumes from its last checkpoint. The default
budget takes about 50 minutes on 2 idle CPU cores; "toy" runs the whole pipeline in seconds on tiny models
(for tests). See ``latentdiffusion.evaluation.latent_vs_pixel`` for what is measured and how.

Compute curves (``--curves``): quality against training FLOPs per f, one stage per f, each resumable and
extendable; its results go to small JSON files under --results (committed), the report into the page's
"Quality against training compute" section and docs/images/latent-vs-pixel-curves.png.

    python benchmarks/latent_vs_pixel.py --curves --stage f4 --until 5.62e14 [--resume]
    python benchmarks/latent_vs_pixel.py --curves --stage report

See ``latentdiffusion.evaluation.latent_vs_pixel_curves`` and the plan in docs/latent-vs-pixel.md.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from latentdiffusion.cli.bench import add_latent_vs_pixel_options, run_latent_vs_pixel
from latentdiffusion.errors import UserError

PROGRAM = "python benchmarks/latent_vs_pixel.py"
CURVE_STAGES = ("classifier", "f1", "f2", "f4", "f8", "report")
RESULTS = Path("benchmarks/results/latent-vs-pixel")


def flops(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of FLOPs such as 3e15, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of FLOPs, got {text!r}")
    return value


def add_curve_options(parser: argparse.ArgumentParser) -> None:
    curves = parser.add_argument_group("compute curves")
    curves.add_argument("--curves", action="store_true", help="quality against training FLOPs per f")
    curves.add_argument(
        "--stage", choices=CURVE_STAGES, default="report", help="what to run (default: report)"
    )
    curves.add_argument(
        "--until", type=flops, help="train f's diffusion model to this many FLOPs (e.g. 3e15)"
    )
    curves.add_argument("--resume", action="store_true", help="continue a stage whose results file exists")
    curves.add_argument("--results", type=Path, default=RESULTS, help="the committed results files")


def run_curves(args: argparse.Namespace, log) -> int:
    """Run one stage of the curves (or none for ``report``), then rewrite the curves' report."""
    import torch

    from latentdiffusion.evaluation import latent_vs_pixel_curves as curves
    from latentdiffusion.evaluation.latent_vs_pixel_curves_report import write_curves_report

    if args.threads:
        torch.set_num_threads(args.threads)
    budget = curves.get_curve_budget(args.budget)
    if args.stage.startswith("f"):
        if args.until is None:
            raise UserError(f"--stage {args.stage} needs --until FLOPS (the diffusion training budget)")
        f = int(args.stage[1:])
        curves.run_stage(
            budget, f, args.until, args.out / "curves", args.results, resume=args.resume, log=log
        )
    elif args.stage == "classifier":
        curves.classifier_stage(budget, args.results, log)
    options = ["--curves", "--budget", args.budget, "--results", str(args.results), "--docs", str(args.docs)]
    paths = write_curves_report(
        curves.load_curves(budget, args.results), args.docs, f"{PROGRAM} {shlex.join(options)}"
    )
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_latent_vs_pixel_options(parser)
    add_curve_options(parser)
    args = parser.parse_args(argv)
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    try:
        if args.curves:
            return run_curves(args, log)
        if args.until is not None or args.resume or args.stage != "report":
            raise UserError("--stage, --until and --resume belong to --curves")
        return run_latent_vs_pixel(args, PROGRAM)
    except UserError as error:
        print(f"latent_vs_pixel: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
