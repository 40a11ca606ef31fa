"""OpenVINO against our own PyTorch path: one guided U-Net call of the SD 1.5 architecture, on the CPU.

    OMP_NUM_THREADS=1 python benchmarks/openvino_unet.py --threads 1 --dir runs/openvino-bench
    python benchmarks/openvino_unet.py --sizes 256 --rounds 1 --contenders "ours bf16" "OpenVINO bf16"

Random weights (the architecture's default initialisation, seed 0) are written once as our native folder
under ``--dir``; every (contender, size, round) then runs in a fresh process that loads them and times
one guided U-Net call (batch 2, 77-token context) on the same inputs: the first call apart, the median of
``--repeats`` after it. Rounds run one after another over all contenders (interleaved), and the table
gives the median over rounds. Contenders:

- ``ours fp32`` / ``ours fp32-fast`` / ``ours bf16``: ``ld.load(folder, precision=...)``, the eager
  PyTorch paths (fp32-fast: float32 with weights packed for oneDNN, ``auto`` on CPUs without bf16);
- ``OpenVINO fp32`` / ``OpenVINO bf16``: ``backend="openvino"`` (``latentdiffusion.backends.openvino``):
  the U-Net converted for the call's static shapes and compiled with that inference-precision hint. The
  first round converts (into a fresh cache under ``--dir``), later rounds import the cached blob, so the
  table shows both costs;
- ``OpenVINO int8 + bf16``: the converted model's weights compressed to int8 by NNCF
  (``nncf.compress_weights``, asymmetric per-channel, the default), compiled with the bf16 hint; needs
  nncf (``--extra-path`` puts a folder with it on the workers' path);
- ``... (AVX2)``: the same process with the CPU's instruction set capped at AVX2 (``AVX2_ENV``: PyTorch's
  ATen, oneDNN and MKL; OpenVINO's own detection and its oneDNN), to emulate a CPU without AVX-512
  (Zen 3).

Under ``--dir`` the weights, the OpenVINO cache and every job's result are kept: a run that is stopped
continues where it stopped (finished jobs are not run again), and ``--report-only`` prints the tables
from what is there.

Reported: seconds per call, conversion (or cache import) seconds, the worker's peak RSS, and the
difference of the output from ``ours fp32`` on the same inputs (max / mean absolute; the output's std is
given for scale). ``time_openvino_unet`` is the function other benchmarks call to time the OpenVINO
contender in their own worker processes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import cpu  # run_job, cpu_flags
from checkpoint_load import peak_rss  # this folder is sys.path[0] for the script and its workers

CONTEXT_TOKENS = 77
# PyTorch's kernels (ATen), its oneDNN (convolutions) and MKL (float32 linear layers); OpenVINO's own ISA
# detection (OV_CPU_MAX_ISA, which takes BF16 off its CPU capabilities) and its plugin's oneDNN
AVX2_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "OV_CPU_MAX_ISA": "AVX2",
}
CONTENDERS = {
    # name: (kind, precision, environment)
    "ours fp32": ("ours", "fp32", {}),
    "ours fp32-fast": ("ours", "fp32-fast", {}),
    "ours bf16": ("ours", "bf16", {}),
    "OpenVINO fp32": ("openvino", "fp32", {}),
    "OpenVINO bf16": ("openvino", "bf16", {}),
    "OpenVINO int8 + bf16": ("int8", "bf16", {}),
    "ours fp32 (AVX2)": ("ours", "fp32", AVX2_ENV),
    "ours fp32-fast (AVX2)": ("ours", "fp32-fast", AVX2_ENV),
    "OpenVINO fp32 (AVX2)": ("openvino", "fp32", AVX2_ENV),
}
REFERENCE = "ours fp32"


# ---------------------------------------------------------------------------------------------------
# In-process measurement (also called by benchmarks/cpu.py)
# ---------------------------------------------------------------------------------------------------


def unet_inputs(size: int, context_dim: int = 768, channels: int = 4) -> tuple[torch.Tensor, ...]:
    """The guided call's inputs at ``size`` pixels (seeded by the size, as benchmarks/cpu.py's)."""
    g = torch.Generator().manual_seed(size)
    x = torch.randn(2, channels, size // 8, size // 8, generator=g)
    context = torch.randn(2, CONTEXT_TOKENS, context_dim, generator=g)
    return x, torch.tensor([500.0, 500.0]), context


def time_openvino_unet(
    folder: str | Path,
    size: int,
    precision: str,
    *,
    repeats: int = 3,
    cache_dir: str | Path | None = None,
    weights: str = "native",
) -> dict[str, Any]:
    """Time our U-Net from the model ``folder`` on OpenVINO for one guided call at ``size`` px.

    ``precision`` "fp32" or "bf16" (the inference-precision hint); ``weights`` "native" (float32 weights)
    or "int8" (NNCF weight compression). Returns {"seconds": median of ``repeats`` calls after the first,
    "first_call": seconds of the first (conversion or cache import included), "prepare": seconds to
    convert (or import), "how": "converted" / "cached", "output": the output tensor}."""
    import latentdiffusion as ld

    pipe = ld.load(str(folder), precision=precision, backend="openvino")
    if cache_dir is not None:
        pipe.backend.cache_dir = Path(cache_dir)
    x, t, context = unet_inputs(size, pipe.unet.config.context_dim, pipe.unet.config.in_channels)
    if weights == "int8":
        call, prepare, how = _int8_call(pipe, x, t, context)
    else:
        unet = pipe.served().unet
        call, prepare, how = (lambda: unet(x, t, context)), None, None
    result = _timed(call, repeats)
    if weights != "int8":
        event = pipe.backend.events[-1]
        prepare, how = event.seconds, event.how
    return {**result, "prepare": prepare, "how": how}


def _int8_call(pipe: Any, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple:
    import nncf

    from latentdiffusion.backends.openvino import convert_unet, network_inputs

    inputs = network_inputs(x, t, context, {})
    start = time.perf_counter()
    model = nncf.compress_weights(convert_unet(pipe.unet, inputs))
    compiled = pipe.backend.core.compile_model(model, "CPU", pipe.backend.config())
    prepare = time.perf_counter() - start
    arrays = [v.numpy() for v in inputs.values()]
    return (lambda: torch.from_numpy(compiled(arrays)[0].copy())), prepare, "converted"


def time_torch_unet(folder: str | Path, size: int, precision: str, *, repeats: int = 3) -> dict[str, Any]:
    """The same measurement for our eager PyTorch U-Net (``ld.load(folder, precision=...)``)."""
    import latentdiffusion as ld

    pipe = ld.load(str(folder), precision=precision)
    dtype = pipe.components.dtype
    x, t, context = unet_inputs(size, pipe.unet.config.context_dim, pipe.unet.config.in_channels)
    x, context = x.to(dtype), context.to(dtype)
    return _timed(lambda: pipe.unet(x, t, context), repeats)


def _timed(call: Any, repeats: int) -> dict[str, Any]:
    with torch.inference_mode():
        start = time.perf_counter()
        output = call()
        first = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "first_call": first, "output": output.float()}


# ---------------------------------------------------------------------------------------------------
# Worker and driver
# ---------------------------------------------------------------------------------------------------


def worker(job: dict[str, Any]) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(job["threads"])
    kind, precision, _ = CONTENDERS[job["contender"]]
    start = time.perf_counter()
    if kind == "ours":
        result = time_torch_unet(job["folder"], job["size"], precision, repeats=job["repeats"])
    else:
        weights = "int8" if kind == "int8" else "native"
        result = time_openvino_unet(
            job["folder"],
            job["size"],
            precision,
            repeats=job["repeats"],
            cache_dir=job["cache"],
            weights=weights,
        )
    torch.save(result.pop("output"), job["output"])
    result.update(wall=time.perf_counter() - start, peak_rss=peak_rss(), openvino=_openvino_version())
    Path(job["result"]).write_text(json.dumps(result))


def _openvino_version() -> str | None:
    try:
        import openvino
    except ImportError:
        return None
    return openvino.get_version()


def run_job(job: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    return cpu.run_job(job, timeout, {**os.environ, **env}, script=__file__)


def write_model(folder: Path, preset: str) -> None:
    import latentdiffusion as ld
    from latentdiffusion.checkpoints.native import NATIVE_CONFIG

    if not (folder / NATIVE_CONFIG).is_file():  # kept between runs under --dir
        ld.load(f"preset:{preset}").save(folder, format="native")


def cpu_flags() -> str:
    return cpu.cpu_flags(("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"))


def header(args: argparse.Namespace) -> list[str]:
    import openvino as ov

    core = ov.Core()
    capabilities = " ".join(core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"))
    load = os.getloadavg()
    return [
        f"{args.preset} architecture, random weights; torch {torch.__version__} (capability "
        f"{torch.backends.cpu.get_cpu_capability()}), OpenVINO {ov.get_version()} (CPU: {capabilities}); "
        f"{args.threads} thread(s); CPU flags: {cpu_flags()}; load average at the end {load[0]:.1f}",
        f"U-Net call = guided batch of 2 with a {CONTEXT_TOKENS}-token context; "
        f"{args.rounds} round(s) x {args.repeats} timed calls",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    parser.add_argument("--avx2-sizes", type=int, nargs="+", default=[256], help="sizes for the AVX2 rows")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--preset", default="sd15")
    parser.add_argument(
        "--dir", type=Path, default=None, help="work folder (weights, cache; default: temporary)"
    )
    parser.add_argument("--extra-path", default=None, help="a folder put on the workers' PYTHONPATH (nncf)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true", help="tables from the jobs under --dir")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.dir or Path(tmp)
        results = run_all(args, base / "weights", base)
    report(args, results, time.perf_counter() - started)


def run_all(args: argparse.Namespace, folder: Path, base: Path) -> dict[tuple[str, int], list[dict]]:
    if not args.report_only:
        write_model(folder, args.preset)
    jobs = base / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, int], list[dict]] = {}
    for round_ in range(args.rounds):
        for size in args.sizes:
            for name in args.contenders:
                env = dict(CONTENDERS[name][2])
                if env and size not in args.avx2_sizes:
                    continue
                if args.extra_path:
                    env["PYTHONPATH"] = os.pathsep.join(
                        filter(None, [args.extra_path, os.environ.get("PYTHONPATH")])
                    )
                stem = jobs / f"{round_}-{size}-{''.join(c if c.isalnum() else '-' for c in name)}"
                job = {
                    "contender": name,
                    "size": size,
                    "folder": str(folder),
                    "cache": str(base / ("cache-avx2" if CONTENDERS[name][2] else "cache")),
                    "repeats": args.repeats,
                    "threads": args.threads,
                    "output": f"{stem}.pt",
                    "result": f"{stem}.json",
                }
                done = Path(job["result"])
                if done.is_file():  # finished by an earlier run of the same --dir
                    result = json.loads(done.read_text())
                elif args.report_only:
                    continue
                else:
                    result = run_job(job, env, args.timeout)
                result["output"] = job["output"]
                results.setdefault((name, size), []).append(result)
                print(f"round {round_ + 1} {size} px {name}: {_summary(result)}", file=sys.stderr, flush=True)
    _differences(results)
    return results


def _summary(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"error: {result['error']}"
    prepare = f", {result['how']} in {result['prepare']:.1f} s" if result.get("prepare") is not None else ""
    return f"{result['seconds']:.2f} s/call{prepare}, peak RSS {result['peak_rss'] / 2**30:.2f} GiB"


def _differences(results: dict[tuple[str, int], list[dict]]) -> None:
    """Each result's max / mean absolute output difference from ours fp32 at its size."""
    for (_, size), runs in results.items():
        reference = next((r for r in results.get((REFERENCE, size), []) if "error" not in r), None)
        for result in runs:
            if "error" in result or reference is None:
                continue
            out, ref = torch.load(result["output"]), torch.load(reference["output"])
            difference = (out - ref).abs()
            result.update(
                max_diff=difference.max().item(), mean_diff=difference.mean().item(), std=ref.std().item()
            )


def report(args: argparse.Namespace, results: dict[tuple[str, int], list[dict]], seconds: float) -> None:
    lines = [*header(args), ""]
    lines += [
        "| contender | size | s/call (median over rounds) | vs ours fp32 | vs ours bf16 "
        "| first-round prepare s | later-round cache import s | peak RSS GiB (first / later round) "
        "| max / mean abs diff vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for (name, size), runs in results.items():
        lines.append(_row(name, size, runs, results))
    lines += ["", f"benchmark wall time: {seconds / 60:.1f} min"]
    print("\n".join(lines))
    if args.json:
        raw = {f"{name} / {size}": runs for (name, size), runs in results.items()}
        args.json.write_text(json.dumps(raw, indent=2, default=str))


def _row(name: str, size: int, runs: list[dict], results: dict) -> str:
    good = [r for r in runs if "error" not in r]
    if not good:
        return f"| {name} | {size} | error: {runs[0]['error']} | | | | | | |"
    seconds = statistics.median(r["seconds"] for r in good)
    ratios = [_ratio(results.get((other, size), []), seconds) for other in ("ours fp32", "ours bf16")]
    prepare = [r for r in good if r.get("how")]
    converted = next((f"{r['prepare']:.1f}" for r in prepare if r["how"] == "converted"), "-")
    cached = next((f"{r['prepare']:.1f}" for r in prepare if r["how"] == "cached"), "-")
    rss = " / ".join(f"{r['peak_rss'] / 2**30:.2f}" for r in good)
    diff = f"{good[0]['max_diff']:.3g} / {good[0]['mean_diff']:.3g}" if "max_diff" in good[0] else "-"
    cells = [name, size, f"{seconds:.2f}", *ratios, converted, cached, rss, diff]
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _ratio(runs: list[dict], seconds: float) -> str:
    good = [r["seconds"] for r in runs if "error" not in r]
    return f"{statistics.median(good) / seconds:.2f}x" if good else "-"


if __name__ == "__main__":
    main()
