"""Latent vs pixel space (Rombach et al. 2022, Sec. 4.1): train and evaluate diffusion models at
downsampling factors f = 1 (pixels), 2, 4, 8 on the shapes world under one equal training budget in FLOPs,
and write docs/latent-vs-pixel.md with the tables plus docs/images/latent-vs-pixel.png (quality against
sampling cost, one point per f).

    python benchmarks/latent_vs_pixel.py [--budget default|toy] [--out runs/latent-vs-pixel] [--docs docs]

The same as ``ldm bench latent-vs-pixel``. Re-running continues the study: finished stages (their
result.json exists) are skipped, an interrupted training resumes from its last checkpoint. The default
budget takes about 50 minutes on 2 idle CPU cores; "toy" runs the whole pipeline in seconds on tiny models
(for tests). See ``latentdiffusion.evaluation.latent_vs_pixel`` for what is measured and how.
"""

from __future__ import annotations

import argparse
import sys

from latentdiffusion.cli.bench import add_latent_vs_pixel_options, run_latent_vs_pixel
from latentdiffusion.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_latent_vs_pixel_options(parser)
    args = parser.parse_args(argv)
    try:
        return run_latent_vs_pixel(args, "python benchmarks/latent_vs_pixel.py")
    except UserError as error:
        print(f"latent_vs_pixel: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
