"""The README's before/after picture of the shipped x4 upscaler on held-out shapes images.

    python benchmarks/upscaler_grid.py [--n 6] [--out docs/images/upscale-before-after.png]

Columns: held-out images (``shapes_quality.held_out``); rows: the 16x16 input (pixels enlarged), its
bicubic enlargement, ``ldm upscale``'s output (the upscaler's defaults, seed 0, the image's caption) and
the original.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from shapes_quality import held_out  # the same held-out images

ROOT = Path(__file__).resolve().parents[1]
SIDE = 64


def main() -> None:
    import latentdiffusion as ld

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=6, help="held-out images (columns)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "upscale-before-after.png")
    args = parser.parse_args()
    _, images, captions = held_out(args.n)
    upscaler = ld.load("upscaler")
    grid = Image.new("RGB", (SIDE * args.n, SIDE * 4))
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        small = image.resize((SIDE // 4, SIDE // 4), Image.BICUBIC)
        rows = [
            small.resize((SIDE, SIDE), Image.NEAREST),
            small.resize((SIDE, SIDE), Image.BICUBIC),
            upscaler.upscale(small, caption, seed=0)[0],
            image,
        ]
        for j, row in enumerate(rows):
            grid.paste(row, (i * SIDE, j * SIDE))
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
