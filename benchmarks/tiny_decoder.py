"""Seconds to decode (and encode) one image with Stable Diffusion's autoencoder and with a tiny one (TAESD).

    OMP_NUM_THREADS=1 python benchmarks/tiny_decoder.py [--size 512] [--repeats 3] [--threads 1]

Both networks have random weights in their real shapes: SD 1.x's KL autoencoder (``config.SD15``) and the
TAESD of SD 1.x/2.x (64 channels, blocks 1-3-3-3 / 3-3-3-1, ``TinyAutoencoderConfig()``). Decode takes a
4 x size/8 x size/8 latent, encode a 3 x size x size image; float32, eager PyTorch, CPU. Each row is the
median of ``repeats`` runs after one warm-up (the full decoder runs once, it is slow), with the FLOPs
counted by ``FlopCounterMode``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from latentdiffusion.config import SD15
from latentdiffusion.models.autoencoder import build_autoencoder
from latentdiffusion.models.tiny_autoencoder import TinyAutoencoder, TinyAutoencoderConfig


def seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def gflop(run) -> float:
    with FlopCounterMode(display=False) as counter:
        run()
    return counter.get_total_flops() / 1e9


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    full, tiny = build_autoencoder(SD15.autoencoder).eval(), TinyAutoencoder(TinyAutoencoderConfig()).eval()
    latents = torch.randn(1, 4, args.size // 8, args.size // 8)
    images = torch.rand(1, 3, args.size, args.size) * 2 - 1
    cases = {
        "SD autoencoder decode": (lambda: full.from_latent(latents), 1),
        "TAESD decode": (lambda: tiny.from_latent(latents), args.repeats),
        "SD autoencoder encode": (lambda: full.to_latent(images), 1),
        "TAESD encode": (lambda: tiny.to_latent(images), args.repeats),
    }
    print(f"{args.size}x{args.size}, float32, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"| {'case':<22} | {'seconds':>8} | {'GFLOP':>8} |")
    print(f"|{'-' * 24}|{'-' * 10}|{'-' * 10}|")
    for name, (run, repeats) in cases.items():
        run()  # warm-up
        print(f"| {name:<22} | {seconds(run, repeats):8.3f} | {gflop(run):8.1f} |")


if __name__ == "__main__":
    main()
