"""Where a U-Net call's time goes: one guided call (batch 2) of a preset's U-Net with random weights,
profiled by operator and grouped into attention, convolution, linear layers and the rest, each with its
FLOPs (torch's FLOP counter) and rate beside the matmul rate measured in the same process.

    OMP_NUM_THREADS=1 python benchmarks/unet_profile.py [--preset sd15] [--size 512] [--threads 1]
        [--precision auto|fp32|bf16]

Prints the CPU model and flags, the call's seconds (median of --repeats), the square matmul rate in the
call's dtype, and a table: share of the profiled time, seconds, GFLOP and GFLOP/s per group. The U-Net's
rate against the matmul rate is the issue's "U-Net call within 80% of the matmul rate" figure; the table
says which group keeps it there. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpu import cpu_flags, cpu_model, unet_flop_counts
from cpu_worker import matmul_gflops, unet_inputs

GROUPS = {  # substrings of profiler / FLOP-counter operator names, first match wins
    # on the meta device the FLOP counter sees attention as its batched matmuls (bmm)
    "attention (scaled_dot_product_attention)": ("scaled_dot_product", "bmm"),
    "convolution": ("convolution",),
    "linear layers (matmul)": ("linear", "addmm", "aten::mm", "aten.mm", "matmul"),
}
OTHER = "the rest (norms, activations, elementwise, copies)"


def group_of(name: str) -> str:
    for group, needles in GROUPS.items():
        if any(needle in name for needle in needles):
            return group
    return OTHER


def build(preset: str, precision: str, size: int):
    """(U-Net, inputs) for one guided call: ``benchmarks/cpu.py``'s U-Net inputs in the model's dtype."""
    import latentdiffusion as ld

    pipe = ld.load(f"preset:{preset}", precision=precision)
    x, t, context = unet_inputs(preset, size)
    dtype = pipe.components.dtype
    return pipe.components.unet, (x.to(dtype), t, context.to(dtype))


def flops_by_group(preset: str, size: int) -> dict[str, float]:
    """FLOPs of the same call per group (``cpu.unet_flop_counts``)."""
    totals: dict[str, float] = {}
    for op, flops in unet_flop_counts(preset, size).items():
        group = group_of(str(op))
        totals[group] = totals.get(group, 0.0) + flops
    return totals


def seconds_by_group(unet, inputs) -> dict[str, float]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        unet(*inputs)
    totals: dict[str, float] = {}
    for event in profile.key_averages():
        group = group_of(event.key)
        totals[group] = totals.get(group, 0.0) + event.self_cpu_time_total / 1e6
    return totals


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="sd15", help="the U-Net's architecture (random weights)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="auto", help="auto (bf16 where native), fp32 or bf16")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}; flags: {cpu_flags()}; torch {torch.__version__}, {args.threads} thread(s)")
    unet, inputs = build(args.preset, args.precision, args.size)
    dtype = inputs[0].dtype
    with torch.inference_mode():
        unet(*inputs)  # warm-up: packing, oneDNN primitives
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            unet(*inputs)
            times.append(time.perf_counter() - start)
        seconds = seconds_by_group(unet, inputs)
    call = statistics.median(times)
    flops = flops_by_group(args.preset, args.size)
    matmul = statistics.median(matmul_gflops(dtype))
    total_flops, profiled = sum(flops.values()), sum(seconds.values())
    rate = total_flops / call / 1e9
    print(
        f"{args.preset} U-Net, guided call (batch 2) at {args.size} px, {str(dtype).removeprefix('torch.')}: "
        f"{call:.3f} s (median of {args.repeats}), {total_flops / 1e9:.0f} GFLOP, {rate:.0f} GFLOP/s = "
        f"{100 * rate / matmul:.0f}% of the {matmul:.0f} GFLOP/s of a square matmul in the same dtype"
    )
    print(f"\nprofiled call: {profiled:.3f} s (the profiler's own overhead included)\n")
    print("| group | share of time | s | GFLOP | GFLOP/s | % of matmul rate |")
    print("|---|---:|---:|---:|---:|---:|")
    for group in [*GROUPS, OTHER]:
        s, f = seconds.get(group, 0.0), flops.get(group, 0.0) / 1e9
        speed = f"{f / s:.0f}" if f and s else "-"
        share = f"{100 * f / s / matmul:.0f}%" if f and s else "-"
        print(f"| {group} | {100 * s / profiled:.1f}% | {s:.3f} | {f:.1f} | {speed} | {share} |")


if __name__ == "__main__":
    main()
