"""``ldm bench``: the project's studies that train, measure and write a report to ``docs/``.

``ldm bench latent-vs-pixel`` is the compression-factor study of Rombach et al. 2022 (Sec. 4.1) on the
shapes world (``evaluation.latent_vs_pixel``); ``benchmarks/latent_vs_pixel.py`` runs the same code.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from latentdiffusion.cli.common import formatter, positive_int

LATENT_VS_PIXEL = (
    "Train a pixel-space diffusion model (f = 1) and latent ones at f = 2, 4, 8 on the shapes world "
    "under one equal training budget in FLOPs, measure reconstruction, training and sampling cost, "
    "prompt adherence and a Frechet distance, and write DOCS/latent-vs-pixel.md with a plot. Re-running "
    "continues: finished stages are skipped, an interrupted training resumes from its last checkpoint. "
    "The default budget takes about 50 minutes on 2 idle CPU cores; 'toy' runs everything in seconds "
    "on tiny models."
)


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="run a study and write its report", description=__doc__)
    studies = parser.add_subparsers(dest="study", metavar="STUDY", required=True)
    study = studies.add_parser(
        "latent-vs-pixel",
        help="latent vs pixel space diffusion under one training budget",
        description=LATENT_VS_PIXEL,
        formatter_class=formatter,
    )
    add_latent_vs_pixel_options(study)
    study.set_defaults(run=lambda args: run_latent_vs_pixel(args, "ldm bench latent-vs-pixel"))


def add_latent_vs_pixel_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", default="default", help="'default' (the study) or 'toy' (seconds)")
    parser.add_argument("--out", type=Path, default=Path("runs/latent-vs-pixel"), help="stage run folders")
    parser.add_argument("--docs", type=Path, default=Path("docs"), help="where the page and the plots go")
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads (None: torch's choice)"
    )
    parser.add_argument("--quiet", action="store_true", help="print no progress lines")


def run_latent_vs_pixel(args: argparse.Namespace, program: str) -> int:
    """Run (or continue) the study, then write the report; ``program`` starts the command it records."""
    import torch

    from latentdiffusion.evaluation.latent_vs_pixel import get_budget, run_study
    from latentdiffusion.evaluation.latent_vs_pixel_report import write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    options = ["--budget", args.budget, "--out", str(args.out), "--docs", str(args.docs)]
    options += ["--threads", str(args.threads)] if args.threads else []
    command = f"{program} {shlex.join(options)}"
    log = (lambda message: None) if args.quiet else (lambda message: print(message, flush=True))
    results = run_study(get_budget(args.budget), args.out, log=log)
    paths = write_report(results, args.out, args.docs, command)
    log("wrote " + ", ".join(str(p) for p in paths))
    return 0
