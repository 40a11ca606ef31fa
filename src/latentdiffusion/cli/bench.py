"""``ldm bench``: the project's studies that train, measure and write a report to ``docs/``.

``ldm bench latent-vs-pixel`` is the compression-factor study of Rombach et al. 2022 (Sec. 4.1) on the
shapes world (``evaluation.latent_vs_pixel``), and with ``--curves`` its quality against training compute
(``evaluation.latent_vs_pixel_curves``). ``benchmarks/latent_vs_pixel.py`` takes the same options, defined
and run here.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from latentdiffusion.cli.common import finite_float, formatter, positive_int
from latentdiffusion.errors import UserError

LATENT_VS_PIXEL = (
    "Train a pixel-space diffusion model (f = 1) and latent ones at f = 2, 4, 8 on the shapes world "
    "under one equal training budget in FLOPs, measure reconstruction, training and sampling cost, "
    "prompt adherence and a Frechet distance, and write DOCS/latent-vs-pixel.md with a plot. Re-running "
    "continues: finished stages are skipped, an interrupted training resumes from its last checkpoint. "
    "The default budget takes about 50 minutes on 2 idle CPU cores; 'toy' runs everything in seconds "
    "on tiny models. With --curves: quality against training FLOPs per f, one --stage at a time "
    "(classifier once, then fN --until FLOPS, extended later with a larger --until and --resume; report "
    "rewrites the page's curves section from the results files); see docs/latent-vs-pixel.md for the plan."
)
CURVE_STAGES = ("classifier", "f1", "f2", "f4", "f8", "report")
CURVE_RESULTS = Path("benchmarks/results/latent-vs-pixel")


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="run a study and write its report", description=__doc__)
    studies = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    study = studies.add_parser(
        "latent-vs-pixel",
        help="latent vs pixel space diffusion: one training budget, or quality against compute",
        description=LATENT_VS_PIXEL,
        formatter_class=formatter,
    )
    add_latent_vs_pixel_options(study)
    study.set_defaults(run=lambda args: run_latent_vs_pixel(args, "ldm bench latent-vs-pixel"))


def add_latent_vs_pixel_options(parser: argparse.ArgumentParser) -> None:
    """The study's options, one-budget and curves (``ldm bench latent-vs-pixel`` and the benchmark script)."""
    parser.add_argument(
        "--budget",
        default="default",
        help="'default' (the study), 'toy' (seconds); with --curves also 'mix' (the first curves' recipe)",
    )
    parser.add_argument("--out", type=Path, default=Path("runs/latent-vs-pixel"), help="stage run folders")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where the page and the plots go")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (None: torch's choice)"
    )
    parser.add_argument("--quiet", action="store_true", help="print no progress lines")
    curves = parser.add_argument_group("compute curves")
    curves.add_argument("--curves", action="store_true", help="quality against training FLOPs per f")
    curves.add_argument("--stage", choices=CURVE_STAGES, help="what to run (default: report)")
    curves.add_argument(
        "--until", type=flops, help="train f's diffusion model to this many FLOPs (e.g. 3e15)"
    )
    curves.add_argument("--resume", action="store_true", help="continue a stage whose results file exists")
    curves.add_argument(
        "--first-stage-from",
        type=Path,
        metavar="RESULTS_FILE",
        help="start a new curve on the converged first stage another results file records (its run "
        "folder copied from where that file says, weights checked)",
    )
    curves.add_argument(
        "--results", type=Path, help=f"the committed results files (default: {CURVE_RESULTS})"
    )


def flops(text: str) -> float:
    try:
        value = finite_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of FLOPs such as 3e15, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of FLOPs, got {text!r}")
    return value


def run_latent_vs_pixel(args: argparse.Namespace, program: str) -> int:
    """Run (or continue) the study, or with ``--curves`` one stage of its curves, then write the report;
    ``program`` starts the command the report records."""
    check_curve_options(args)
    if args.curves:
        return run_curves(args, program)
    from latentdiffusion.evaluation.latent_vs_pixel import get_budget, run_study
    from latentdiffusion.evaluation.latent_vs_pixel_report import write_report

    set_threads(args.threads)
    options = ["--budget", args.budget, "--out", str(args.out), "--docs", str(args.docs)]
    options += ["--threads", str(args.threads)] if args.threads else []
    log = progress_log(args)
    results = run_study(get_budget(args.budget), args.out, log=log)
    paths = write_report(results, args.out, args.docs, f"{program} {shlex.join(options)}")
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


def check_curve_options(args: argparse.Namespace) -> None:
    """Refuse curve options that the chosen mode or stage would ignore, before any work."""
    given = [
        name for name in ("stage", "until", "results", "first_stage_from") if getattr(args, name) is not None
    ]
    if not args.curves:
        if given or args.resume:
            raise UserError("--stage, --until, --resume, --results and --first-stage-from belong to --curves")
        return
    args.stage = args.stage or "report"
    args.results = args.results or CURVE_RESULTS
    if args.stage.startswith("f") and args.until is None:
        raise UserError(
            f"--stage {args.stage} needs --until FLOPS (the diffusion training budget, e.g. 1e14)"
        )
    if not args.stage.startswith("f") and (args.until is not None or args.resume or args.first_stage_from):
        raise UserError(
            "--until, --resume and --first-stage-from belong to a curve stage (f1, f2, f4, f8), "
            f"not {args.stage}"
        )


def run_curves(args: argparse.Namespace, program: str) -> int:
    """Run one stage of the curves (or none for ``report``), then rewrite the curves' report."""
    from latentdiffusion.evaluation import latent_vs_pixel_curves as curves
    from latentdiffusion.evaluation.latent_vs_pixel_curves_report import write_curves_report

    set_threads(args.threads)
    budget, log = curves.get_curve_budget(args.budget), progress_log(args)
    if args.stage.startswith("f"):
        f, out = int(args.stage[1:]), args.out / "curves"
        curves.run_stage(
            budget, f, args.until, out, args.results, resume=args.resume, log=log,
            first_stage_from=args.first_stage_from,
        )  # fmt: skip
    elif args.stage == "classifier":
        curves.classifier_stage(budget, args.results, log)
    options = ["--curves", "--budget", args.budget, "--results", str(args.results), "--docs", str(args.docs)]
    command = f"{program} {shlex.join(options)}"
    paths = write_curves_report(curves.load_curves(budget, args.results), args.docs, command)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def progress_log(args: argparse.Namespace):
    return (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
