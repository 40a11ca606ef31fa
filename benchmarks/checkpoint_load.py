"""Time and peak memory (RSS) of loading a full-size SD 1.5 single file, each case in a fresh process.

    python benchmarks/checkpoint_load.py [--file-dtype fp16|fp32] [--dir DIR]

Writes a random-weight ``v1-5``-architecture single file in the original layout (about 2.1 GB in fp16,
4.3 GB in fp32; no yaml, so the variant is detected from its header), then loads it in fresh
processes:

- ``ld.load`` into float32 networks (the default) and into the file's own dtype;
- for comparison, the straightforward way: ``safetensors.torch.load_file`` (a full copy in memory),
  networks built with random initialisation, then ``load_state_dict`` (a second copy).

Each row reports seconds to a usable pipeline, the process's peak RSS during loading (``VmHWM``, which
counts the pages of a memory-mapped file that are resident) and its peak after touching every weight
once (file pages that a memory-mapped load has not read are not resident until then). A process that
only imports torch and latentdiffusion is measured for the baseline, and the size of the networks in
memory is printed for scale.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
CASES = ("ld.load -> fp32", "ld.load -> file dtype", "load_file + init + load_state_dict")


def write_random_sd15(path: Path, dtype: torch.dtype) -> None:
    """Random N(0, 0.02) weights in the original SD 1.5 layout, written with our streaming writer."""
    from latentdiffusion.checkpoints.assemble import build_on_meta
    from latentdiffusion.checkpoints.layout import write_layout
    from latentdiffusion.checkpoints.safe_io import save_safetensors
    from latentdiffusion.checkpoints.single_file import single_file_layouts
    from latentdiffusion.config import PRESETS

    config = PRESETS["sd15"]
    layouts = single_file_layouts(config, "hf")
    generator = torch.Generator().manual_seed(0)
    state = {}
    for attribute, module in build_on_meta(config).items():
        for key, meta in write_layout(module.state_dict(), layouts[attribute]).items():
            state[key] = torch.empty(meta.shape, dtype=dtype).normal_(0, 0.02, generator=generator)
    save_safetensors(state, path)


def peak_rss() -> int:
    """VmHWM: this process's high-water RSS in bytes (unlike ru_maxrss, not inherited from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (this benchmark needs Linux)")


def measure(case: str, path: str, dtype_name: str) -> dict[str, float]:
    """Runs in the child process: load, then report timings and RSS."""
    import latentdiffusion as ld

    start = time.perf_counter()
    if case == CASES[0]:
        pipe = ld.load(path)
    elif case == CASES[1]:
        pipe = ld.load(path, dtype=DTYPES[dtype_name])
    else:
        pipe = _naive_load(path)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    with torch.no_grad():
        checksum = sum(float(p.float().sum()) for m in modules for p in m.parameters())
    touched = peak_rss()
    size = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return {"seconds": seconds, "peak": peak, "touched": touched, "model": size, "checksum": checksum}


def _naive_load(path: str):
    """The plain way: random init, a full copy of the file in memory, a strict copying load."""
    from safetensors.torch import load_file

    from latentdiffusion.checkpoints.assemble import check_fits
    from latentdiffusion.checkpoints.single_file import read_plan, split_single_file
    from latentdiffusion.components import build_components
    from latentdiffusion.pipelines.pipeline import Pipeline

    state = load_file(path)
    plan = read_plan(Path(path), state)
    components = build_components(plan.config)
    for role, part in split_single_file(state, plan, path).items():
        module = components.modules[role]
        check_fits(module, part, path)
        dtype = next(iter(module.state_dict().values())).dtype
        module.load_state_dict({k: v.to(dtype) for k, v in part.items()}, strict=True)
    return Pipeline(components)


def in_child(call: str, module: str = "checkpoint_load") -> object:
    """Evaluate ``call`` (an expression over the benchmark ``module`` of this folder, imported as ``b``) in
    a fresh Python, so that its peak RSS is its own; return its JSON."""
    here = str(Path(__file__).resolve().parent)
    code = f"import json, sys; sys.path.insert(0, {here!r}); import {module} as b; "
    code += f"print(json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_line() -> str:
    """torch, threads, CPU capability and the CPU flags that decide the fast path, for every benchmark."""
    from latentdiffusion.pipelines.precision import _cpuinfo_flags, cpu_has_bf16

    flags = _cpuinfo_flags()
    shown = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, flags: {' '.join(shown) or 'none'}, native bf16: "
        f"{cpu_has_bf16()}"
    )


def baseline_rss() -> int:
    import latentdiffusion  # noqa: F401  (what every case imports before loading)

    return peak_rss()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--file-dtype", choices=list(DTYPES), default="fp16")
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the file (default: a temp dir)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "sd15-random.safetensors"
        start = time.perf_counter()
        in_child(f"b.write_random_sd15(b.Path({str(path)!r}), b.DTYPES[{args.file_dtype!r}])")
        seconds = time.perf_counter() - start
        print(f"wrote {path.stat().st_size / 2**30:.2f} GiB ({args.file_dtype}) in {seconds:.1f} s")
        base = in_child("b.baseline_rss()")
        print(f"RSS of a process that only imported torch and latentdiffusion: {base / 2**30:.2f} GiB\n")
        print("| case | load s | peak RSS GiB | RSS after touching all weights GiB | networks GiB |")
        print("|---|---|---|---|---|")
        for case in CASES:
            r = in_child(f"b.measure({case!r}, {str(path)!r}, {args.file_dtype!r})")
            gib = [r[k] / 2**30 for k in ("peak", "touched", "model")]
            print(f"| {case} | {r['seconds']:.1f} | {gib[0]:.2f} | {gib[1]:.2f} | {gib[2]:.2f} |")


if __name__ == "__main__":
    main()
