"""Latent vs pixel space (Rombach et al. 2022, Sec. 4.1): train and evaluate diffusion models at
downsampling factors f = 1 (pixels), 2, 4, 8 on the shapes world.

One budget (the default): every f trains under one equal budget in FLOPs; writes docs/latent-vs-pixel.md
with the tables plus docs/images/latent-vs-pixel.png (quality against sampling cost, one point per f).

    python benchmarks/latent_vs_pixel.py [--budget default|toy] [--out runs/latent-vs-pixel] [--docs docs]

The same as ``ldm bench latent-vs-pixel``, whose options and code (``latentdiffusion.cli.bench``) it runs.
Re-running continues the study: finished stages (their result.json exists) are skipped, an interrupted
training resumes from its last checkpoint. The default budget takes about 50 minutes on 2 idle CPU cores;
"toy" runs the whole pipeline in seconds on tiny models (for tests). See
``latentdiffusion.evaluation.latent_vs_pixel`` for what is measured and how.

Compute curves (``--curves``): quality against training FLOPs per f, one stage per f, each resumable and
extendable; its results go to small JSON files under --results (committed), the report into the page's
"Quality against training compute" section and docs/images/latent-vs-pixel-curves.png.

    python benchmarks/latent_vs_pixel.py --curves --stage f4 --until 5.62e14 [--resume]
    python benchmarks/latent_vs_pixel.py --curves --stage report

See ``latentdiffusion.evaluation.latent_vs_pixel_curves`` and the plan in docs/latent-vs-pixel.md.
"""

from __future__ import annotations

import argparse
import sys

from latentdiffusion.cli.bench import add_latent_vs_pixel_options, run_latent_vs_pixel
from latentdiffusion.errors import UserError

PROGRAM = "python benchmarks/latent_vs_pixel.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_latent_vs_pixel_options(parser)
    args = parser.parse_args(argv)
    try:
        return run_latent_vs_pixel(args, PROGRAM)
    except UserError as error:
        print(f"latent_vs_pixel: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
