"""The tables and the target lines ``benchmarks/cpu.py`` prints from its workers' results."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from cpu import (
    DEFAULT_FAST,
    FEW_STEPS,
    ISA_ENV,
    REFERENCE,
    TARGET_MATMUL_SHARE,
    TARGET_ONE_STEP,
    TARGET_PSNR,
    TARGET_SPEEDUP,
    Driver,
    cpu_flags,
    cpu_model,
    dnnl_isa,
    image_size,
    is_peer,
    native_bf16,
    psnr,
)
from cpu_worker import CONTEXT_TOKENS, Config


def verdict(met: bool) -> str:
    return "met" if met else "missed"


def psnr_verdict(quality: str) -> str:
    return "not measured (no ours fp32 image)" if quality == "n/a" else verdict(float(quality) >= TARGET_PSNR)


def ok(result: dict[str, Any] | None) -> bool:
    return bool(result) and "error" not in result


def matmul_of(result: dict[str, Any]) -> tuple[str, float]:
    """The matmul rate a U-Net call is compared with: bf16 for a bf16 contender on native bf16, else fp32."""
    rates = result["matmul_gflops"]
    kind = "bf16" if result["resolved"] == "bf16" and "bf16" in rates else "fp32"
    return kind, rates[kind]


def speed_table(driver: Driver, chosen: list[Config], flops: dict[int, float]) -> list[str]:
    sizes = sorted(flops)
    cells = " | ".join(f"U-Net {s} px s | GFLOP/s | % of matmul" for s in sizes)
    lines = [f"| configuration | precision | {cells} | matmul GFLOP/s fp32 / bf16 | load s | peak RSS GB |"]
    lines.append("|---" * (5 + 3 * len(sizes)) + "|")
    for config in chosen:
        result = driver.results.get((config.name, "unet"))
        if result is None:
            continue
        if "error" in result:
            lines.append(f"| {config.name} | failed: {result['error']} |")
            continue
        kind, matmul = matmul_of(result)
        row = []
        for size in sizes:
            seconds = result["seconds"][str(size)]
            rate = flops[size] / seconds
            row += [f"{seconds:.3f}", f"{rate:.0f}", f"{100 * rate / matmul:.0f}% ({kind})"]
        rates = result["matmul_gflops"]
        matmuls = f"{rates['fp32']:.0f} / " + (f"{rates['bf16']:.0f}" if "bf16" in rates else "-")
        tail = f"{matmuls} | {result['load_seconds']:.1f} | {result['peak_rss'] / 1e9:.2f}"
        lines.append(f"| {config.name} | {result['resolved']} | " + " | ".join(row) + f" | {tail} |")
    return lines


def image_file(driver: Driver, name: str, task: str, steps: int) -> Path | None:
    result = driver.results.get((name, task))
    if not ok(result):
        return None
    return Path(result["job"]["output"].format(steps=steps))


def image_table(driver: Driver, chosen: list[Config], steps: int) -> list[str]:
    best = best_peer(driver, chosen, steps)
    head = "| configuration | precision | seconds | vs best peer | peak RSS GB (process / generating) |"
    lines = [head + " PSNR vs ours fp32, dB |", "|---|---|---|---|---|---|"]
    reference = image_file(driver, REFERENCE, "image", steps)
    for config in chosen:
        result = driver.results.get((config.name, "image"))
        if result is None:
            continue
        if "error" in result:
            lines.append(f"| {config.name} | failed: {result['error']} |")
            continue
        seconds = result["seconds"][str(steps)]
        speed = f"{best[1] / seconds:.2f}x" if best else "n/a"
        generating = result.get("peak_rss_generate")
        rss = f"{result['peak_rss'] / 1e9:.2f} / " + (
            "n/a" if generating is None else f"{generating / 1e9:.2f}"
        )
        own = image_file(driver, config.name, "image", steps)
        quality = "(reference)" if config.name == REFERENCE else _psnr_cell(own, reference)
        lines.append(
            f"| {config.name} | {result['resolved']} | {seconds:.1f} | {speed} | {rss} | {quality} |"
        )
    return lines


def _psnr_cell(a: Path | None, b: Path | None) -> str:
    return "n/a" if a is None or b is None else f"{psnr(a, b):.1f}"


def best_peer(driver: Driver, chosen: list[Config], steps: int) -> tuple[str, float] | None:
    """(name, seconds) of the fastest peer image (diffusers eager or through OpenVINO)."""
    times = [
        (config.name, driver.results[(config.name, "image")]["seconds"][str(steps)])
        for config in chosen
        if is_peer(config) and ok(driver.results.get((config.name, "image")))
    ]
    return min(times, key=lambda item: item[1]) if times else None


def few_step_table(driver: Driver, chosen: list[Config]) -> list[str]:
    cells = " | ".join(f"{n} step{'s' if n > 1 else ''} s" for n in FEW_STEPS)
    last = FEW_STEPS[-1]
    lines = [f"| configuration | precision | {cells} | peak RSS GB | PSNR vs diffusers fp32 ({last} steps) |"]
    lines.append("|---" * (4 + len(FEW_STEPS)) + "|")
    peer = image_file(driver, "diffusers fp32", "fewstep", FEW_STEPS[-1])
    for config in chosen:
        result = driver.results.get((config.name, "fewstep"))
        if result is None:
            continue
        if "error" in result:
            lines.append(f"| {config.name} | failed: {result['error']} |")
            continue
        row = " | ".join(f"{result['seconds'][str(n)]:.2f}" for n in FEW_STEPS)
        own = image_file(driver, config.name, "fewstep", FEW_STEPS[-1])
        quality = "(peer)" if config.name == "diffusers fp32" else _psnr_cell(own, peer)
        lines.append(
            f"| {config.name} | {result['resolved']} | {row} | {result['peak_rss'] / 1e9:.2f} | {quality} |"
        )
    return lines


def difference_table(driver: Driver, chosen: list[Config], sizes: list[int]) -> list[str]:
    lines = ["| configuration | " + " | ".join(f"U-Net {s} px max / mean abs" for s in sizes) + " |"]
    lines.append("|---" * (1 + len(sizes)) + "|")
    reference = driver.results.get((REFERENCE, "unet"))
    if not ok(reference):
        return []
    expected = torch.load(reference["job"]["output"])
    for config in chosen:
        own = driver.results.get((config.name, "unet"))
        if config.name == REFERENCE or not ok(own):
            continue
        actual = torch.load(own["job"]["output"])
        cells = [
            f"{(actual[s] - expected[s]).abs().max():.2e} / {(actual[s] - expected[s]).abs().mean():.2e}"
            for s in sizes
        ]
        lines.append(f"| {config.name} | " + " | ".join(cells) + " |")
    return lines


def target_lines(
    driver: Driver, chosen: list[Config], flops: dict[int, float], args: argparse.Namespace
) -> list[str]:
    lines = [f"Targets (reported, not asserted; image side {image_size(args)} px):"]
    fast = driver.results.get((DEFAULT_FAST, "image"))
    best = best_peer(driver, chosen, args.steps)
    if ok(fast) and best:
        seconds = fast["seconds"][str(args.steps)]
        quality = _psnr_cell(
            image_file(driver, DEFAULT_FAST, "image", args.steps),
            image_file(driver, REFERENCE, "image", args.steps),
        )
        speedup = best[1] / seconds
        lines.append(
            f"- default fast ({fast['resolved']} + DeepCache {args.deepcache}) per image: {seconds:.1f} s, "
            f"{speedup:.2f}x the best peer ({best[0]}, {best[1]:.1f} s) [target >= {TARGET_SPEEDUP}x: "
            f"{verdict(speedup >= TARGET_SPEEDUP)}]; PSNR vs ours fp32 {quality} dB "
            f"[target >= {TARGET_PSNR:.0f}: {psnr_verdict(quality)}]"
        )
    lines += _matmul_share_lines(driver, chosen, flops)
    one = driver.results.get((DEFAULT_FAST, "fewstep"))
    if ok(one):
        seconds, threads = one["seconds"]["1"], args.threads or torch.get_num_threads()
        lines.append(
            f"- one-step 512x512 image ({args.few_step_preset} architecture, tiny decoder, "
            f"{one['resolved']}): {seconds:.2f} s on {threads} thread(s) [target < {TARGET_ONE_STEP:.0f} s "
            f"on 2 cores: {verdict(seconds < TARGET_ONE_STEP)}]"
        )
    return lines


def _matmul_share_lines(driver: Driver, chosen: list[Config], flops: dict[int, float]) -> list[str]:
    lines = []
    for config in chosen:
        result = driver.results.get((config.name, "unet"))
        if config.side != "ours" or config.precision == "fp32" or not ok(result):
            continue
        kind, matmul = matmul_of(result)
        shares = {s: flops[s] / result["seconds"][str(s)] / matmul for s in flops}
        text = ", ".join(f"{s} px {100 * share:.0f}%" for s, share in shares.items())
        met = "met" if min(shares.values()) >= TARGET_MATMUL_SHARE else "missed"
        lines.append(f"- {config.name} U-Net call vs the {kind} matmul rate: {text} [target >= 80%: {met}]")
    return lines


def header(args: argparse.Namespace, driver: Driver) -> list[str]:
    native = native_bf16(args.isa)
    capabilities = {
        r.get("cpu_capability") for r in driver.results.values() if ok(r) and "cpu_capability" in r
    }
    threads = args.threads or torch.get_num_threads()
    lines = [
        f"{cpu_model()}; flags: {cpu_flags()}; torch {torch.__version__}, {threads} thread(s)",
        f"workers: PyTorch CPU capability {', '.join(sorted(c for c in capabilities if c)) or 'n/a'}, "
        f"oneDNN ISA {dnnl_isa(driver.env)}, native bf16 as 'auto' sees it: {native}",
    ]
    if args.cpu_time:
        lines.append("all seconds are process CPU seconds (--cpu-time), not wall time")
    if args.isa:
        env = " ".join(f"{k}={v}" for k, v in ISA_ENV[args.isa].items())
        lines.append(f"EMULATED: an {args.isa.upper()}-only CPU ({env}) on the CPU above; not a real one")
    lines.append(
        f"{args.preset} architecture, random weights; U-Net call = guided batch of 2 with a "
        f"{CONTEXT_TOKENS}-token context"
    )
    return lines


def report(
    args: argparse.Namespace,
    driver: Driver,
    chosen: list[Config],
    flops: dict[int, float],
    notes: list[str],
    seconds: float,
) -> None:
    sizes = sorted(flops)
    lines = [*header(args, driver), *notes, ""]
    lines += ["U-Net FLOPs per call: " + ", ".join(f"{s} px {flops[s]:.0f} GFLOP" for s in sizes), ""]
    lines += [*speed_table(driver, chosen, flops), ""]
    side = image_size(args)
    lines += [f"{args.steps}-step DPM++ 2M guided (7.5) image, {side}x{side}, end to end:", ""]
    lines += [*image_table(driver, chosen, args.steps), ""]
    if not args.no_few_step:
        lines += [
            f"{args.few_step_preset} architecture, 512x512, no guidance, tiny decoder (TAESD), end to end:",
            "",
        ]
        lines += [*few_step_table(driver, chosen), ""]
    lines += ["U-Net output difference from ours fp32 (same inputs):", ""]
    lines += [*difference_table(driver, chosen, sizes), ""]
    lines += [*target_lines(driver, chosen, flops, args), ""]
    lines += [f"benchmark wall time: {seconds / 60:.1f} min"]
    print("\n".join(lines))
    if args.json:
        raw = {f"{name} / {task}": result for (name, task), result in driver.results.items()}
        args.json.write_text(json.dumps({"flops_gflop": flops, "results": raw}, indent=2, default=str))
