"""Does a motion model read the prompt's direction word? A held-out loss contrast, much cheaper than
generating clips (``evaluation.motion_eval``).

    python benchmarks/motion_direction_contrast.py runs/motion/run/export [--clips 16] [--alpha A]

For held-out moving-shapes clips whose caption says "moving left/right/up/down", the denoising loss of
the clip at fixed noise levels and fixed noise (the module's mixed noise prior, ``--alpha`` overriding
it) is computed with the clip's own caption and with the opposite direction word ("right" <-> "left",
"up" <-> "down"). A model that uses the word has a lower loss with its own caption, by more at high noise
where the path is decided; one that ignores it has equal losses and "own lower" near half the clips.
(Modules that animate a given first frame get the clip's frame 0 clean and are scored on the others.)
The last column is the control: the caption with the object's colour word changed instead, a word
every model here reads.
Loads the export folder's ``motion_module.safetensors`` with its learned words and spatial LoRA file
where they exist. Prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

TIMES = (950, 800, 600, 400, 200)
HELD_OUT_SEED = 777_777  # not a training stream (those use the run's seed)


def direction_clips(count: int, frames: int) -> list[tuple[torch.Tensor, str, str, str]]:
    """(clip [3, F, 64, 64], caption, caption with the opposite direction, caption with another object
    colour) of the first ``count`` held-out clips that move (not bounce) in one direction."""
    from dataclasses import replace

    from latentdiffusion.training.moving_shapes import (
        OPPOSITE_DIRECTIONS,
        MovingShapesDataset,
        format_motion_prompt,
        parse_motion_prompt,
    )
    from latentdiffusion.training.shapes import COLOURS

    colours = list(COLOURS)
    data, clips, index = MovingShapesDataset(HELD_OUT_SEED, frames), [], 0
    while len(clips) < count:
        x, caption = data[index]
        index += 1
        spec = parse_motion_prompt(caption)
        if spec.motion == "moving":
            flipped = replace(spec, direction=OPPOSITE_DIRECTIONS[spec.direction])
            other = colours[(colours.index(spec.colour) + 1) % len(colours)]
            recoloured = replace(spec, colour=other)
            clips.append((x, caption, format_motion_prompt(flipped), format_motion_prompt(recoloured)))
    return clips


def clip_loss(network, process, prediction_type: str, z0, eps, time: int, cond: dict) -> float:
    """Mean squared error of the model's prediction for one clip's latents z0 [F, C, h, w] at ``time``,
    conditioned on ``cond`` (one prompt's text states). Modules that animate a given first frame see
    frame 0 clean and are scored on the later frames."""
    t = torch.full((z0.shape[0],), time)
    z_t = process.add_noise(z0, eps, t)
    target = process.training_target(prediction_type, z0, eps, t)
    first = network.motion.config.first_frame
    if first:
        cond = {**cond, "first_frame": z0[:1]}
    prediction = network(z_t.transpose(0, 1)[None], process.network_timestep(t[:1]), **cond)
    error = (prediction[0].transpose(0, 1).float() - target).pow(2)
    return (error[1:] if first else error).mean().item()


def contrast(export: Path, count: int, alpha: float | None) -> list[tuple[int, float, float, int, float]]:
    import latentdiffusion as ld
    from latentdiffusion.models.motion import VideoUNet, mixed_noise
    from latentdiffusion.pipelines.animate import load_motion, with_motion_words, words_folder
    from latentdiffusion.pipelines.text_to_image import encode_conditioning
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
    process, prediction_type = components.process, components.config.schedule.prediction_type
    rows = []
    with torch.no_grad():
        prepared = []  # per clip, once: its scaled latents and its three captions' text states
        for x, *captions in clips:
            z = components.autoencoder.encode(x.transpose(0, 1)).mean
            conds = [encode_conditioning(components, [c], [""], 64, 64)[0] for c in captions]
            prepared.append(((z - scale.shift_factor) * scale.scaling_factor, conds))
        for time in TIMES:
            own = opposite = wins = control = 0.0
            for z0, conds in prepared:
                eps = torch.randn(z0.shape, generator=generator)
                if alpha:
                    shared = torch.randn((1, *z0.shape[1:]), generator=generator)
                    eps = mixed_noise(eps[None], shared[None], alpha)[0]
                a, b, c = (
                    clip_loss(network, process, prediction_type, z0, eps, time, cond) for cond in conds
                )
                own, opposite, wins, control = own + a, opposite + b, wins + (a < b), control + c
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
