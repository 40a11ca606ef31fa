"""Does a motion model read the prompt's direction word? A held-out loss contrast, much cheaper than
generating clips (``evaluation.motion_eval``).

    python benchmarks/motion_direction_contrast.py runs/motion/run/export [--clips 16] [--alpha A]

For held-out moving-shapes clips whose caption says "moving left/right/up/down", the denoising loss of
the clip at fixed noise levels and fixed noise (the module's mixed noise prior, ``--alpha`` overriding
it) is computed with the clip's own caption and with the opposite direction word ("right" <-> "left",
"up" <-> "down"). A model that uses the word has a lower loss with its own caption, by more at high noise
where the path is decided; one that ignores it has equal losses and "own lower" near half the clips.
The last column is the control: the caption with the object's colour word changed instead, a word
every model here reads.
Loads the export folder's ``motion_module.safetensors`` with its learned words and spatial LoRA file
where they exist. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

OPPOSITE = {"right": "left", "left": "right", "up": "down", "down": "up"}
TIMES = (950, 800, 600, 400, 200)
HELD_OUT_SEED = 777_777  # not a training stream (those use the run's seed)


def direction_clips(count: int, frames: int) -> list[tuple[torch.Tensor, str, str, str]]:
    """(clip [3, F, 64, 64], caption, caption with the opposite direction, caption with another object
    colour) of the first ``count`` held-out clips that move (not bounce) in one direction."""
    from latentdiffusion.training.moving_shapes import MovingShapesDataset
    from latentdiffusion.training.shapes import COLOURS

    colours = list(COLOURS)

    data, clips, index = MovingShapesDataset(HELD_OUT_SEED, frames), [], 0
    while len(clips) < count:
        x, caption = data[index]
        index += 1
        found = re.search(r"\bmoving (right|left|up|down)\b", caption)
        if found:
            flipped = caption.replace(found[0], f"moving {OPPOSITE[found[1]]}")
            colour = caption.split()[1]  # "a <colour> <shape> ..."
            recoloured = caption.replace(
                f" {colour} ", f" {colours[(colours.index(colour) + 1) % len(colours)]} ", 1
            )
            clips.append((x, caption, flipped, recoloured))
    return clips


def clip_loss(network, components, z0: torch.Tensor, eps: torch.Tensor, time: int, prompt: str) -> float:
    """Mean squared error of the model's prediction for one clip's latents z0 [F, C, h, w] at ``time``."""
    from latentdiffusion.pipelines.text_to_image import encode_conditioning

    process, frames = components.process, z0.shape[0]
    t = torch.full((frames,), time)
    z_t = process.add_noise(z0, eps, t)
    target = process.training_target(components.config.schedule.prediction_type, z0, eps, t)
    cond, _ = encode_conditioning(components, [prompt], [""], 64, 64)
    prediction = network(z_t.transpose(0, 1)[None], process.network_timestep(t[:1]), **cond)
    return (prediction[0].transpose(0, 1).float() - target).pow(2).mean().item()


def contrast(export: Path, count: int, alpha: float | None) -> list[tuple[int, float, float, int, float]]:
    import latentdiffusion as ld
    from latentdiffusion.models.motion import VideoUNet, mixed_noise
    from latentdiffusion.pipelines.animate import load_motion, with_motion_words, words_folder
    from latentdiffusion.training.motion import spatial_lora_file
    from latentdiffusion.training.moving_shapes import FRAMES

    module_file = export / "motion_module.safetensors"
    lora = spatial_lora_file(module_file)
    pipe = ld.load("default", loras=[(str(lora), 1.0)] if lora.exists() else [])
    motion = load_motion(str(module_file)).float().eval()
    alpha = motion.config.noise_correlation if alpha is None else alpha
    words = words_folder(module_file)
    components = with_motion_words(pipe.components, words if words.exists() else None)
    network = VideoUNet(components.unet, motion)
    scale = components.config.autoencoder
    generator = torch.Generator().manual_seed(0)
    clips = direction_clips(count, FRAMES)
    rows = []
    with torch.no_grad():
        for time in TIMES:
            own = opposite = wins = control = 0.0
            for x, caption, flipped, recoloured in clips:
                z = components.autoencoder.encode(x.transpose(0, 1)).mean
                z0 = (z - scale.shift_factor) * scale.scaling_factor
                eps = torch.randn(z0.shape, generator=generator)
                if alpha:
                    shared = torch.randn((1, *z0.shape[1:]), generator=generator)
                    eps = mixed_noise(eps[None], shared[None], alpha)[0]
                a = clip_loss(network, components, z0, eps, time, caption)
                b = clip_loss(network, components, z0, eps, time, flipped)
                control += clip_loss(network, components, z0, eps, time, recoloured)
                own, opposite, wins = own + a, opposite + b, wins + (a < b)
            n = len(clips)
            rows.append((time, own / n, opposite / n, int(wins), control / n))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("export", type=Path, help="a motion run's export folder")
    parser.add_argument("--clips", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=None, help="noise correlation (default: the module's)")
    args = parser.parse_args()
    rows = contrast(args.export, args.clips, args.alpha)
    print(
        f"| timestep | loss, own caption | loss, opposite direction | own lower (of {args.clips}) "
        "| loss, other colour (control) |"
    )
    print("|---|---|---|---|---|")
    for time, own, opposite, wins, control in rows:
        print(f"| {time} | {own:.5f} | {opposite:.5f} | {wins} | {control:.5f} |")


if __name__ == "__main__":
    main()
