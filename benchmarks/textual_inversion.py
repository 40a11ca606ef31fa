"""Textual inversion on the shapes world: teach the default model a colour its vocabulary lacks.

    python benchmarks/textual_inversion.py images DIR [--count 12] [--seed 0]
    python benchmarks/textual_inversion.py eval --embedding FILE --token WORD --init-word green [--count 60]

``images`` renders ``count`` single-object scenes whose object is ``NEW_COLOUR`` (forest green: not in
``training.shapes.COLOURS``), each with a same-stem caption in which ``{token}`` stands where the colour
word would be. ``eval`` generates held-out prompts ``a <word> <shape> ... on a <colour> background``
(other seeds, so other shapes, backgrounds, sizes and positions) and judges the largest object's
measured colour against the world's palette plus the new colour (``shapes_checker.name_colour``):
with the embedding loaded (word = token), and without it (word = the init word, the plain token, the
English colour name); and, as the ceiling, the same scenes drawn in the colour and passed through the
model's autoencoder (the default model's autoencoder was trained on the world's 9 colours only: it turns
pink into a pale lavender, so no word can make pink; dark green survives it). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image

NEW_COLOUR = ("forest", (20, 105, 40))  # a dark green the autoencoder keeps (pink: it cannot)
EVAL_SEED = 100_000  # eval scenes are drawn from seeds no training image uses


def render_in(scene, rgb: tuple[int, int, int]) -> Image.Image:
    """``scene`` (one object) drawn with its object in ``rgb`` (area anti-aliased as ``render``)."""
    from latentdiffusion.training.shapes import COLOURS, coverage

    alpha = coverage(scene.objects[0])[..., None]  # [64, 64, 1]
    background = np.array(COLOURS[scene.background], dtype=np.float32)
    pixels = alpha * np.array(rgb, dtype=np.float32) + (1 - alpha) * background
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def prompt_for(scene, rng: np.random.Generator, word: str) -> str:
    """The scene's caption with ``word`` for its object's colour."""
    from latentdiffusion.training.shapes import caption

    obj = scene.objects[0]
    return re.sub(rf"\b{obj.colour} {obj.shape}\b", f"{word} {obj.shape}", caption(scene, rng), count=1)


def make_images(folder: Path, count: int, seed: int) -> None:
    from latentdiffusion.training.shapes import sample_scene

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        scene = sample_scene(rng, "single")
        render_in(scene, NEW_COLOUR[1]).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(prompt_for(scene, rng, "{token}") + "\n")
    print(f"{count} images of {NEW_COLOUR[0]} shapes with captions in {folder}")


def eval_scenes(count: int, seed: int) -> list:
    from latentdiffusion.training.shapes import sample_scene

    return [sample_scene(EVAL_SEED + seed + i, "single") for i in range(count)]


def judge(images, scenes) -> dict[str, float]:
    """Share of images whose largest object has the new colour / the right shape."""
    from latentdiffusion.evaluation.shapes_checker import detect, name_colour
    from latentdiffusion.training.shapes import COLOURS

    palette = {**COLOURS, NEW_COLOUR[0]: NEW_COLOUR[1]}
    new = shape = 0
    for image, scene in zip(images, scenes, strict=True):
        background, found = detect(image, palette)  # objects near the background's colour found too
        if found and found[0].rgb is not None:
            new += name_colour(found[0].rgb, palette, exclude=background) == NEW_COLOUR[0]
            shape += found[0].shape == scene.objects[0].shape
    return {"new colour": new / len(images), "shape": shape / len(images)}


def roundtrip(pipe, image: Image.Image) -> Image.Image:
    """``image`` through the model's autoencoder (encode, decode): what its latents can show at best."""
    import torch

    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    with torch.no_grad():
        autoencoder = pipe.components.autoencoder
        y = autoencoder.decode(autoencoder.encode(x).mean)[0]
    return Image.fromarray(((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def generate(pipe, prompts, seed: int, steps: int) -> list[Image.Image]:
    images = []
    for start in range(0, len(prompts), 16):
        images += pipe.generate(prompts[start : start + 16], seed=seed + start, steps=steps)
    return images


def evaluate(args: argparse.Namespace) -> None:
    import latentdiffusion as ld

    scenes = eval_scenes(args.count, args.seed)
    conditions = [
        ("embedding loaded", args.token, True),
        ("init word, no embedding", args.init_word, False),
        ("plain token, no embedding", args.token, False),
        (f"the word '{NEW_COLOUR[0]}', no embedding", NEW_COLOUR[0], False),
    ]
    rows = []
    base = ld.load(args.model)
    ceiling = judge([roundtrip(base, render_in(s, NEW_COLOUR[1])) for s in scenes], scenes)
    rows.append(("the scenes drawn in the colour, through the autoencoder (its ceiling)", "-", ceiling, 0.0))
    for label, word, loaded in conditions:
        pipe = ld.load(args.model)
        if loaded:
            pipe.load_embedding(args.embedding, args.token)
        # the same optional attributes (size, position) under every condition
        prompts = [
            prompt_for(s, np.random.default_rng((EVAL_SEED, args.seed, i)), word)
            for i, s in enumerate(scenes)
        ]
        start = time.perf_counter()
        images = generate(pipe, prompts, args.seed, args.steps)
        scores = judge(images, scenes)
        rows.append((label, word, scores, time.perf_counter() - start))
        if args.grid and loaded:
            from latentdiffusion.evaluation.shapes_eval import grid

            grid(images[:32]).save(args.grid)
    print(
        f"| prompts ({args.count} held-out scenes, {args.steps} steps) | word "
        f"| {NEW_COLOUR[0]} object | shape |"
    )
    print("|---|---|---|---|")
    for label, word, scores, _ in rows:
        print(f"| {label} | {word} | {100 * scores['new colour']:.1f}% | {100 * scores['shape']:.1f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    images = commands.add_parser("images", help="render the training images")
    images.add_argument("folder", type=Path)
    images.add_argument("--count", type=int, default=12)
    images.add_argument("--seed", type=int, default=0)
    run = commands.add_parser("eval", help="measure how often prompts with the word show the new colour")
    run.add_argument("--model", default="default")
    run.add_argument("--embedding", type=Path, required=True)
    run.add_argument("--token", required=True)
    run.add_argument("--init-word", default="green")
    run.add_argument("--count", type=int, default=60)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--steps", type=int, default=20)
    run.add_argument("--grid", type=Path, default=None, help="save the first 32 images with the embedding")
    args = parser.parse_args()
    if args.command == "images":
        make_images(args.folder, args.count, args.seed)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
