"""Peak memory and seconds per step of a full-size SD3.5 Medium with T5-XXL on this CPU, in 24 GB.

    python benchmarks/sd3_memory.py [--precision bf16 fp32] [--t5 yes no] [--sizes 512 1024]
                                    [--steps 2] [--large-steps 1] [--dir DIR | --file FILE]

Writes a random-weight SD3.5 Medium single file in the released layout, in bfloat16: the 2.5 B MMDiT,
CLIP-L, OpenCLIP bigG, T5-XXL's 4.7 B encoder and the 16-channel autoencoder (15.2 GiB; recognised from
its keys). The file is streamed one tensor at a time from a lazy mapping whose tensors are windows of one
shared random pool, so writing it never holds more than the pool (300 MB) in memory.

Then, for each precision and with or without T5 (``ld.load(file, precision=..., t5=False)``), in a fresh
process: load (memory-mapped), one text-to-image generation with classifier-free guidance (MMDiT batch 2)
at each size, in order, and the decode. Reports load seconds, the encoding seconds (prompts in, first
MMDiT call), seconds per sampling step, the decode, the peak RSS (``VmHWM``, file pages included) after
loading, after encoding and after generating, and the RSS while sampling (``VmRSS`` after the first
step: the MMDiT's weights read, T5's pages handed back). The step column is the median of the steps
after the first (which includes reading the MMDiT's pages and packing its weights) where there are more;
sizes past 512 run ``--large-steps`` steps after the 512 image has warmed everything. Random weights
make noise images; the cost is the same as a trained model's.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from checkpoint_load import (
    cpu_line,
    in_child,
    peak_rss,
)  # this folder is sys.path[0] for the script and its children

PROMPT = "a photograph of a lighthouse on a cliff at dusk, waves breaking below"
NEGATIVE = "blurry, low quality"


class RandomWeights(Mapping[str, torch.Tensor]):
    """key -> N(0, 0.02) tensor of the given shape, made on access as a window of one random pool (at a
    place fixed by the key), so a whole model's state never exists in memory at once."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype, seed: int = 0) -> None:
        self.shapes = dict(shapes)
        largest = max(math.prod(shape) for shape in self.shapes.values())
        generator = torch.Generator().manual_seed(seed)
        self.pool = torch.empty(largest + 2**24, dtype=dtype).normal_(0, 0.02, generator=generator)

    def __getitem__(self, key: str) -> torch.Tensor:
        shape = self.shapes[key]
        size = math.prod(shape)
        start = zlib.crc32(key.encode()) % (self.pool.numel() - size + 1)
        return self.pool[start : start + size].view(shape)

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def write_random_sd35_medium(path: Path) -> None:
    """The released SD3.5 Medium single-file layout (MMDiT, CLIP-L, bigG, T5-XXL, autoencoder), bf16."""
    from latentdiffusion.checkpoints.assemble import build_on_meta
    from latentdiffusion.checkpoints.layout import write_layout
    from latentdiffusion.checkpoints.safe_io import save_safetensors
    from latentdiffusion.config import PRESETS
    from latentdiffusion.families import family_of

    config = PRESETS["sd35-medium"]
    layouts = family_of(config).single_file_layouts(config)
    shapes = {}
    for role, module in build_on_meta(config).items():
        for key, meta in write_layout(module.state_dict(), layouts[role]).items():
            shapes[key] = tuple(meta.shape)
    save_safetensors(RandomWeights(shapes, torch.bfloat16), path)


def rss() -> int:
    """VmRSS: this process's resident memory now, in bytes (memory-mapped file pages included)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (this benchmark needs Linux)")


def measure(path: str, precision: str, t5: bool, sizes: list[int], steps: list[int]) -> dict:
    """Runs in the child process: load, one guided image per size, times and memory after each part."""
    import latentdiffusion as ld

    start = time.perf_counter()
    pipe = ld.load(path, precision=precision, t5=t5)
    result = {"load": time.perf_counter() - start, "load_peak": peak_rss(), "sizes": {}}
    for size, count in zip(sizes, steps, strict=True):
        result["sizes"][size] = generate(pipe, size, count)
    return result


def generate(pipe: object, size: int, steps: int) -> dict[str, float | list[float]]:
    marks: list[float] = []
    first_call: dict[str, float] = {}

    def encoded(*_: object) -> None:  # the first MMDiT call: every prompt is encoded
        if not first_call:
            first_call.update(time=time.perf_counter(), peak=peak_rss())

    def stepped(*_: object) -> None:
        marks.append(time.perf_counter())
        if len(marks) == 1:  # the MMDiT's weights are resident now, T5's pages handed back
            first_call.update(rss=rss())

    hook = pipe.components.network.register_forward_pre_hook(encoded)
    start = time.perf_counter()
    pipe.generate(
        PROMPT,
        negative_prompt=NEGATIVE,
        width=size,
        height=size,
        steps=steps,
        seed=0,
        callback=stepped,
    )
    done = time.perf_counter()
    hook.remove()
    step_times = [b - a for a, b in zip([first_call["time"], *marks[:-1]], marks, strict=True)]
    return {
        "encode": first_call["time"] - start,
        "encode_peak": first_call["peak"],
        "sampling_rss": first_call["rss"],
        "steps": step_times,
        "decode": done - marks[-1],
        "peak": peak_rss(),
    }


def warm_step(times: list[float]) -> float:
    """The step time without the first step's one-off costs when there is more than one step."""
    return statistics.median(times[1:] if len(times) > 1 else times)


def print_rows(precision: str, t5: bool, r: dict) -> None:
    gib = 2**30
    for size, s in r["sizes"].items():
        print(
            f"| {precision} | {'yes' if t5 else 'no'} | {size} | {r['load']:.0f} | {s['encode']:.0f} | "
            f"{warm_step(s['steps']):.1f} ({len(s['steps'])}) | {s['decode']:.1f} | "
            f"{r['load_peak'] / gib:.1f} | {s['encode_peak'] / gib:.1f} | {s['sampling_rss'] / gib:.1f} | "
            f"{s['peak'] / gib:.1f} |",
            flush=True,
        )


def run(path: Path, args: argparse.Namespace) -> None:
    steps = [args.steps if size <= 512 else args.large_steps for size in args.sizes]
    print(f"SD3.5 Medium, guided (MMDiT batch 2), the model's default sampler; sizes {args.sizes}\n")
    header = (
        "| precision | T5 | size | load s | encode s | s/step (steps) | decode s | peak RSS after load GiB "
        "| peak RSS after encode GiB | RSS sampling GiB | peak RSS GiB |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for precision in args.precision:
        for t5 in args.t5:
            call = f"b.measure({str(path)!r}, {precision!r}, {t5 == 'yes'}, {args.sizes}, {steps})"
            print_rows(precision, t5 == "yes", in_child(call, "sd3_memory"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    parser.add_argument("--t5", nargs="+", default=["yes", "no"], choices=["yes", "no"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--steps", type=int, default=2, help="steps at 512 and below")
    parser.add_argument("--large-steps", type=int, default=1, help="steps above 512")
    parser.add_argument("--dir", type=Path, default=None, help="where to write the file (default: temp)")
    parser.add_argument("--file", type=Path, default=None, help="an SD3.5 Medium file to use instead")
    parser.add_argument("--write-only", type=Path, default=None, help="write the random file there, stop")
    args = parser.parse_args()
    print(cpu_line(), flush=True)
    if args.write_only is not None:
        start = time.perf_counter()
        in_child(f"b.write_random_sd35_medium(b.Path({str(args.write_only)!r}))", "sd3_memory")
        size = args.write_only.stat().st_size / 2**30
        print(f"wrote {size:.2f} GiB (bf16) in {time.perf_counter() - start:.0f} s")
        return
    if args.file is not None:
        run(args.file, args)
        return
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "sd35-medium-random.safetensors"
        start = time.perf_counter()
        in_child(f"b.write_random_sd35_medium(b.Path({str(path)!r}))", "sd3_memory")
        print(f"wrote {path.stat().st_size / 2**30:.2f} GiB (bf16) in {time.perf_counter() - start:.0f} s\n")
        run(path, args)


if __name__ == "__main__":
    main()
