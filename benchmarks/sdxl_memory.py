"""Peak memory and seconds per step of a full-size SDXL base model at 1024x1024 on this CPU.

    python benchmarks/sdxl_memory.py [--precision bf16 fp32] [--steps 2] [--dir DIR]

Writes a random-weight SDXL base single file in the original (sgm) layout and in float16, as the released
files are (2.6 B U-Net parameters, 6.9 GB; no metadata, so the model is recognised from its keys), then,
for each precision in a fresh process: ``ld.load(file, precision=...)`` (memory-mapped; bf16 converts
layer by layer, fp32 upcasts), one 1024x1024 text-to-image generation with classifier-free guidance
(a batch of 2 per U-Net call) and the tiled decode. Reports load seconds, seconds per sampling step
(median), the decode, and the peak RSS (``VmHWM``) after loading and after generating. Random weights
make noise images; the cost is the same as a trained model's.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from checkpoint_load import (
    cpu_line,
    in_child,
    peak_rss,
)  # this folder is sys.path[0] for the script and its children

SIZE = 1024


def write_random_sdxl(path: Path) -> None:
    """N(0, 0.02) float16 weights in the SDXL base single-file layout, written with our writer."""
    from latentdiffusion.checkpoints.assemble import build_on_meta
    from latentdiffusion.checkpoints.layout import write_layout
    from latentdiffusion.checkpoints.safe_io import save_safetensors
    from latentdiffusion.config import PRESETS
    from latentdiffusion.families import family_of

    config = PRESETS["sdxl"]
    layouts = family_of(config).single_file_layouts(config)
    generator = torch.Generator().manual_seed(0)
    state = {}
    for role, module in build_on_meta(config).items():
        for key, meta in write_layout(module.state_dict(), layouts[role]).items():
            state[key] = torch.empty(meta.shape, dtype=torch.float16).normal_(0, 0.02, generator=generator)
    save_safetensors(state, path)


def measure(path: str, precision: str, steps: int) -> dict[str, float | list[float]]:
    """Runs in the child process: load, generate one image, report times and peaks."""
    import latentdiffusion as ld

    start = time.perf_counter()
    pipe = ld.load(path, precision=precision)
    loaded = time.perf_counter()
    load_peak = peak_rss()
    marks: list[float] = []
    pipe.generate(
        "a photograph of a lighthouse",
        negative_prompt="blurry",
        width=SIZE,
        height=SIZE,
        steps=steps,
        seed=0,
        callback=lambda *_: marks.append(time.perf_counter()),
    )
    done = time.perf_counter()
    step_times = [b - a for a, b in zip([loaded, *marks[:-1]], marks, strict=True)]
    return {
        "load": loaded - start,
        "steps": step_times,
        "decode": done - marks[-1],
        "load_peak": load_peak,
        "peak": peak_rss(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the file (default: a temp dir)"
    )
    args = parser.parse_args()
    print(cpu_line())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "sdxl-base-random.safetensors"
        start = time.perf_counter()
        in_child(f"b.write_random_sdxl(b.Path({str(path)!r}))", "sdxl_memory")
        print(f"wrote {path.stat().st_size / 2**30:.2f} GiB (fp16) in {time.perf_counter() - start:.0f} s\n")
        print(f"SDXL base, {SIZE}x{SIZE}, {args.steps} steps DPM++ 2M with guidance (U-Net batch 2)\n")
        print("| precision | load s | s/step (median) | decode s | peak RSS after load GiB | peak RSS GiB |")
        print("|---|---|---|---|---|---|")
        for precision in args.precision:
            r = in_child(f"b.measure({str(path)!r}, {precision!r}, {args.steps})", "sdxl_memory")
            step = statistics.median(r["steps"])
            print(
                f"| {precision} | {r['load']:.0f} | {step:.1f} | {r['decode']:.1f} | "
                f"{r['load_peak'] / 2**30:.1f} | {r['peak'] / 2**30:.1f} |"
            )


if __name__ == "__main__":
    main()
