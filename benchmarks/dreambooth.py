"""DreamBooth on the default model (64 px shapes world): teach it a ring, a shape its captions never name.

    python benchmarks/dreambooth.py instances runs/dreambooth-rings         # the 6 instance images
    python benchmarks/dreambooth.py class-data runs/dreambooth-circles      # 100 real class images
    python benchmarks/dreambooth.py measure --model base=default \\
        --model prior=runs/db-prior/export --model no-prior=runs/db-no-prior/export [--n 32]

The subject is a red ring (a disc with a concentric hole of half its diameter, drawn with the shapes
world's own supersampled rasteriser) on a white background, in six sizes and places; its prompt is
"a red sks circle on a white background", the class prompt "a red circle on a white background" (a
caption the world does have). ``measure`` prints a markdown table, per model:

- ring (instance prompt): the share of images of the instance prompt on held-out seeds that show a ring
  (``is_ring``: the largest object's centre shows the background colour through the hole);
- ring (new backgrounds): the same on backgrounds the instance images never had (blue, black, yellow,
  green, gray, purple);
- class prompt, checker: the strict checker's whole-prompt accuracy ("all": colour, shape and
  background right, ``evaluation.shapes_checker.check``) and its shape accuracy on the class prompt;
- ring (class prompt): how often the class prompt now draws rings (the drift prior preservation fights);
- shapes prompts: whole-prompt accuracy on random captions of both forms (``ldm eval-shapes`` prompts),
  the rest of the model's knowledge.

Seeds start at 10000 (the class images of a run use seeds 0..N-1): every measured image is new.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

INSTANCE_PROMPT = "a red sks circle on a white background"
CLASS_PROMPT = "a red circle on a white background"
NEW_BACKGROUNDS = ("blue", "black", "yellow", "green", "gray", "purple")
# (centre x, centre y, outer diameter) of the instance rings, in pixels of the 64x64 canvas
RINGS = ((32, 32, 30), (22, 24, 28), (42, 40, 29), (40, 22, 27), (24, 42, 30), (34, 30, 31))
HOLE = 0.5  # hole diameter / outer diameter
SEED = 10_000


def ring_image(centre_x: float, centre_y: float, extent: float, colour: str, background: str) -> Image.Image:
    """A ring drawn as the shapes world draws its circles (4x supersampled ellipse, box-downsampled)."""
    from latentdiffusion.training.shapes import COLOURS, IMAGE_SIZE, SUPERSAMPLE

    side = IMAGE_SIZE * SUPERSAMPLE
    canvas = Image.new("RGB", (side, side), COLOURS[background])
    draw = ImageDraw.Draw(canvas)
    for diameter, fill in ((extent, colour), (extent * HOLE, background)):
        half = diameter / 2
        box = [
            round(v * SUPERSAMPLE)
            for v in (centre_x - half, centre_y - half, centre_x + half, centre_y + half)
        ]
        draw.ellipse((box[0], box[1], box[2] - 1, box[3] - 1), fill=COLOURS[fill])
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def write_instances(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (x, y, extent) in enumerate(RINGS):
        path = folder / f"ring-{i}.png"
        ring_image(x, y, extent, "red", "white").save(path)
        paths.append(path)
    return paths


def write_class_data(folder: Path, count: int) -> None:
    """``count`` shapes-world renders of the class prompt (sizes and places drawn from seed 0): real
    class images for ``ldm finetune --dreambooth --class-data``."""
    from latentdiffusion.training.shapes import parse_prompt, place, render

    folder.mkdir(parents=True, exist_ok=True)
    spec, rng = parse_prompt(CLASS_PROMPT), np.random.default_rng(0)
    for i in range(count):
        render(place(spec, rng)).save(folder / f"class-{i:05d}.png")


def is_ring(image: Image.Image) -> bool:
    """The largest object has a hole at its centre: the 3x3 pixels there are nearer the background's
    colour than half-way to the object's."""
    from latentdiffusion.evaluation.shapes_checker import detect, estimate_background
    from latentdiffusion.training.shapes import COLOURS

    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    _, found = detect(image)
    if not found:
        return False
    _, background = estimate_background(pixels)
    x, y = (round(v - 0.5) for v in found[0].centre)
    centre = pixels[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].reshape(-1, 3).mean(axis=0)
    contrast = np.linalg.norm(np.asarray(COLOURS[found[0].colour]) - background)
    return bool(np.linalg.norm(centre - background) < 0.5 * contrast)


def generate(pipe, prompts: list[str], seed: int, batch: int = 16) -> list[Image.Image]:
    images: list[Image.Image] = []
    for start in range(0, len(prompts), batch):
        images += pipe.generate(prompts[start : start + batch], seed=seed + start)
    return images


def measure(model: str, n: int) -> dict[str, float]:
    import latentdiffusion as ld
    from latentdiffusion.evaluation.shapes_checker import check, summarise
    from latentdiffusion.evaluation.shapes_eval import eval_prompts

    path, _, lora = model.partition(":")
    pipe = ld.load(path, **({"loras": [(lora, 1.0)]} if lora else {}))
    instance = generate(pipe, [INSTANCE_PROMPT] * n, SEED)
    moved = [INSTANCE_PROMPT.replace("white", NEW_BACKGROUNDS[i % len(NEW_BACKGROUNDS)]) for i in range(n)]
    elsewhere = generate(pipe, moved, SEED + n)
    classes = generate(pipe, [CLASS_PROMPT] * n, SEED + 2 * n)
    class_scores = summarise([check(image, CLASS_PROMPT) for image in classes])
    prompts = [p for form in eval_prompts(n // 2, seed=SEED).values() for p in form]
    shapes = summarise(
        [check(i, p) for i, p in zip(generate(pipe, prompts, SEED + 3 * n), prompts, strict=True)]
    )
    return {
        "ring (instance prompt)": np.mean([is_ring(i) for i in instance]),
        "ring (new backgrounds)": np.mean([is_ring(i) for i in elsewhere]),
        "class prompt: all": class_scores["all"],
        "class prompt: shape": class_scores["shape"],
        "ring (class prompt)": np.mean([is_ring(i) for i in classes]),
        "shapes prompts: all": shapes["all"],
    }


def table(rows: dict[str, dict[str, float]], n: int) -> str:
    columns = list(next(iter(rows.values())))
    lines = [f"| model (n = {n} per cell) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label, scores in rows.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * scores[c]:.0f}%" for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("instances").add_argument("folder", type=Path)
    real = commands.add_parser("class-data")
    real.add_argument("folder", type=Path)
    real.add_argument("--count", type=int, default=100)
    meter = commands.add_parser("measure")
    meter.add_argument("--model", action="append", required=True, help="LABEL=MODEL[:LORA_FILE]")
    meter.add_argument("--n", type=int, default=32)
    args = parser.parse_args()
    if args.command == "class-data":
        write_class_data(args.folder, args.count)
        print(f"{args.count} class images in {args.folder}")
        return
    if args.command == "instances":
        for path in write_instances(args.folder):
            print(path)
        return
    rows = {}
    for entry in args.model:
        label, _, model = entry.partition("=")
        rows[label] = measure(model, args.n)
        print(label, {k: round(float(v), 3) for k, v in rows[label].items()}, flush=True)
    print(table(rows, args.n))


if __name__ == "__main__":
    main()
