"""The README's picture of the shipped default model: the fixed prompts of tests/test_default_model.py at
seed 0 and the model's default settings, upscaled 2x (nearest) and tiled left to right.

    python benchmarks/default_model_grid.py [--out docs/images/default-model.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "default-model.png")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    import latentdiffusion as ld
    from latentdiffusion.training.task import image_grid
    from test_default_model import PROMPTS

    pipe = ld.load("default")
    images = pipe.generate(PROMPTS, seed=0)
    print(images[0].info["parameters"].splitlines()[-1])
    large = [image.resize((128, 128), Image.Resampling.NEAREST) for image in images]
    image_grid(large, len(large), background="white").save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
