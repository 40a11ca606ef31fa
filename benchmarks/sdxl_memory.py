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
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from checkpoint_load import peak_rss  # this folder is sys.path[0] for the script and its children

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


def in_child(call: str) -> object:
    """Evaluate ``call`` (an expression over this module, ``b``) in a fresh Python; return its JSON."""
    here = str(Path(__file__).resolve().parent)
    code = f"import json, sys; sys.path.insert(0, {here!r}); import sdxl_memory as b; "
    code += f"print(json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_line() -> str:
    from latentdiffusion.pipelines.precision import _cpuinfo_flags, cpu_has_bf16

    flags = _cpuinfo_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, flags: {' '.join(shown) or 'none'}, native bf16: "
        f"{cpu_has_bf16()}"
    )


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
        in_child(f"b.write_random_sdxl(b.Path({str(path)!r}))")
        print(f"wrote {path.stat().st_size / 2**30:.2f} GiB (fp16) in {time.perf_counter() - start:.0f} s\n")
        print(f"SDXL base, {SIZE}x{SIZE}, {args.steps} steps DPM++ 2M with guidance (U-Net batch 2)\n")
        print("| precision | load s | s/step (median) | decode s | peak RSS after load GiB | peak RSS GiB |")
        print("|---|---|---|---|---|---|")
        for precision in args.precision:
            r = in_child(f"b.measure({str(path)!r}, {precision!r}, {args.steps})")
            step = statistics.median(r["steps"])
            print(
                f"| {precision} | {r['load']:.0f} | {step:.1f} | {r['decode']:.1f} | "
                f"{r['load_peak'] / 2**30:.1f} | {r['peak'] / 2**30:.1f} |"
            )


if __name__ == "__main__":
    main()
