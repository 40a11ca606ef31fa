"""Which shapes fail the strict checker, and why: the default model's single-object prompts and its
autoencoder's reconstructions of the same kind of scene.

    python benchmarks/shape_failures.py [--model default] [--n 100] [--steps 20] [--sampler dpmpp_2m] \
        [--sigmas karras] [--cfg 1.5] [--squares 60] [--denoise 0.1 0.2 0.4]

Generation: the first ``--n`` single-object eval-shapes prompts (``shapes_eval.eval_prompts``, prompt i with
seed i, batches of 20), each image's largest object judged by ``shapes_checker.analyse``: passes, wrong
shape, or the strict criteria it fails (``Detection.defects``), counted per stated shape. Autoencoder:
``--squares`` single-square scenes of the held-out shapes stream (seed 123) encoded and decoded (the
posterior mean, and one posterior sample: what the denoiser is trained on), judged the same way, beside
the originals. ``--denoise S ...``: the first 40 of those squares noised to img2img strength S and denoised by
the model towards their captions (seed i for square i), judged the same way. Prints markdown tables and the
CPU flags.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from cpu import cpu_flags  # this folder is on sys.path (above)

HELD_OUT_SEED = 123
BATCH = 20


def verdict(image: Image.Image, shape: str) -> list[str]:
    """ "pass", "no object", "drawn as SHAPE", or the strict criteria the largest object fails."""
    from latentdiffusion.evaluation.shapes_checker import analyse

    found = analyse(image).detections
    if not found:
        return ["no object"]
    if found[0].shape != shape:
        return [f"drawn as {found[0].shape}"]
    return list(found[0].defects) or ["pass"]


def generated(pipe, n: int, settings: dict) -> dict[str, collections.Counter]:
    from latentdiffusion.evaluation.shapes_eval import eval_prompts
    from latentdiffusion.training.shapes import parse_prompt

    prompts = eval_prompts(n, 0)["single"]
    tally: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for start in range(0, n, BATCH):
        batch = prompts[start : start + BATCH]
        for image, prompt in zip(pipe.generate(batch, seed=start, **settings), batch, strict=True):
            shape = parse_prompt(prompt).objects[0].shape
            tally[shape].update(["prompts", *verdict(image, shape)])
    return tally


DENOISED_SQUARES = 40  # squares that --denoise noises and denoises at each strength


def held_out_squares(count: int) -> list[tuple[Image.Image, str]]:
    """The first ``count`` single-square scenes of the held-out shapes stream, with their captions."""
    from latentdiffusion.training.shapes import ShapesDataset, parse_prompt

    dataset, squares, index = ShapesDataset(HELD_OUT_SEED), [], 0
    while len(squares) < count:
        image, caption = dataset[index]
        index += 1
        spec = parse_prompt(caption)
        if spec.relation is None and spec.objects[0].shape == "square":
            squares.append((image, caption))
    return squares


def denoised(pipe, squares, strengths: list[float], settings: dict) -> dict[str, collections.Counter]:
    """Each square noised to ``strength`` and denoised towards its caption (img2img, seed i for square i):
    how much noise the model's denoiser takes to lose a square it was given."""
    tally: dict[str, collections.Counter] = {}
    for strength in strengths:
        row = tally[f"strength {strength:g}"] = collections.Counter()
        for seed, (image, caption) in enumerate(squares):
            row.update(
                verdict(pipe.img2img(image, caption, strength=strength, seed=seed, **settings)[0], "square")
            )
    return tally


def reconstructed(pipe, squares) -> dict[str, collections.Counter]:
    from latentdiffusion.training.shapes import images_to_tensor

    scenes = [image for image, _ in squares]
    autoencoder = pipe.components.autoencoder
    tally = {"originals": collections.Counter()}
    for original in scenes:
        tally["originals"].update(verdict(original, "square"))
    if not scenes:
        return tally
    with torch.no_grad():
        x = images_to_tensor(scenes).to(next(autoencoder.parameters()).dtype)
        posterior = autoencoder.encode(x)
        noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(0))
        latents = {  # the posterior mean, and a posterior sample: what the denoiser is trained on
            "reconstructions (posterior mean)": posterior.mean,
            "reconstructions (posterior sample)": posterior.mean
            + posterior.std * noise.to(posterior.mean.dtype),
        }
        for row, z in latents.items():
            out = autoencoder.decode(z).float().clamp(-1, 1)
            pixels = ((out.permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
            tally[row] = collections.Counter()
            for array in pixels:
                tally[row].update(verdict(Image.fromarray(array), "square"))
    return tally


def table(first: str, tally: dict[str, collections.Counter]) -> str:
    keys = sorted({k for counts in tally.values() for k in counts} - {"prompts", "pass"})
    columns = (["prompts"] if any("prompts" in c for c in tally.values()) else []) + ["pass", *keys]
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, counts in sorted(tally.items()):
        lines.append(f"| {name} | " + " | ".join(str(counts[c]) for c in columns) + " |")
    return "\n".join(lines)


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=100, help="single-object prompts")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--sigmas", default=None, help="noise-level discretisation (as ldm generate)")
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--squares", type=int, default=60, help="held-out square scenes to reconstruct")
    parser.add_argument(
        "--denoise",
        type=float,
        nargs="*",
        default=[],
        metavar="STRENGTH",
        help=f"also noise the first {DENOISED_SQUARES} held-out squares to each img2img strength and "
        "denoise them",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)

    import latentdiffusion as ld

    pipe = ld.load(args.model, precision="auto")
    settings = {
        "steps": args.steps,
        "sampler": args.sampler,
        "sigmas": args.sigmas,
        "guidance_scale": args.cfg,
    }
    settings = {k: v for k, v in settings.items() if v is not None}
    print(f"model {args.model}, {settings or 'its defaults'}; CPU flags: {cpu_flags()}; 1 thread\n")
    print("Largest object of each generated image (a failing object may count under several criteria):\n")
    print(table("stated shape", generated(pipe, args.n, settings)))
    print(f"\n{args.squares} held-out single squares through the model's autoencoder:\n")
    squares = held_out_squares(max(args.squares, DENOISED_SQUARES if args.denoise else 0))
    print(table("images", reconstructed(pipe, squares[: args.squares])))
    if args.denoise:
        heading = "held-out single squares noised to an img2img strength and denoised by the model"
        print(f"\n{DENOISED_SQUARES} {heading}:\n")
        print(table("noised to", denoised(pipe, squares[:DENOISED_SQUARES], args.denoise, settings)))


if __name__ == "__main__":
    main()
