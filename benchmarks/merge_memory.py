"""Peak memory and seconds of ``ldm merge`` on two full-size SD 1.5 float16 single files on this CPU.

    python benchmarks/merge_memory.py [--dir DIR] [--keep] [--naive]

Writes two random-weight SD 1.5 files (N(0, 0.02) float16, 1.07 B parameters, about 2.1 GB each) with
every key and shape of a released ``v1-5-pruned-emaonly.safetensors`` (sd-mecha's ``sd1-ldm`` model
config, read as text; without sd-mecha, our own SD 1.5 layout), then, each in a fresh process: the
baseline (``import latentdiffusion`` and torch), ``ldm merge A B -o OUT --alpha 0.3`` (weighted sum) and
``--block-weights`` with 26 values, and with ``--naive`` the whole-model way for comparison (both files
loaded, merged in memory and saved). Reports seconds and the peak RSS (``VmHWM``). The files are
deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from checkpoint_load import cpu_line, in_child, peak_rss  # this folder is sys.path[0] for the script

_ENTRY = re.compile(r"^    (\S+): \{shape: \[([\d, ]*)\], dtype: (\w+)(.*)\}$")
BLOCKS = ",".join(["0.5"] + [str(round(i / 24, 3)) for i in range(25)])  # BASE then IN00..OUT11


def sd15_shapes() -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of a released SD 1.5 file: sd-mecha's list, or our writer's layout."""
    spec = importlib.util.find_spec("sd_mecha")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "extensions" / "builtin" / "model_configs" / "sd1-ldm.yaml"
        shapes = {}
        for line in path.read_text().splitlines():
            match = _ENTRY.match(line)
            if match and "optional: true" not in match.group(4):
                shape = tuple(int(n) for n in match.group(2).split(",") if n.strip())
                shapes[match.group(1)] = (shape, torch.float16)
        return shapes
    from latentdiffusion.checkpoints.single_file import single_file_state
    from latentdiffusion.components import Components
    from latentdiffusion.config import PRESETS
    from latentdiffusion.families import family_of

    config = PRESETS["sd15"]
    with torch.device("meta"):
        modules = family_of(config).build(config)
    state = single_file_state(Components(config, modules, {}, "sd15"))
    return {
        k: (tuple(v.shape), torch.float16 if v.is_floating_point() else v.dtype) for k, v in state.items()
    }


def write_random(path: Path, seed: int) -> int:
    """A random SD 1.5 single file, written one tensor at a time; returns its size in bytes."""
    from latentdiffusion.checkpoints.safetensors_stream import TensorSpec, write_streamed

    generator = torch.Generator().manual_seed(seed)
    specs = [TensorSpec(k, dtype, shape) for k, (shape, dtype) in sd15_shapes().items()]

    def make(spec: TensorSpec) -> torch.Tensor:
        if not spec.dtype.is_floating_point:
            return torch.zeros(spec.shape, dtype=spec.dtype)
        return (torch.randn(spec.shape, generator=generator) * 0.02).to(spec.dtype)

    write_streamed(path, specs, make)
    return path.stat().st_size


def baseline() -> dict[str, float]:
    import latentdiffusion  # noqa: F401

    return {"seconds": 0.0, "peak": peak_rss()}


def run_merge(a: str, b: str, out: str, blocks: bool) -> dict[str, float]:
    """Runs in the child process: ``ldm merge`` as the command line runs it."""
    from latentdiffusion.cli.main import main

    args = ["merge", a, b, "-o", out, "--alpha", "0.3"] + (["--block-weights", BLOCKS] if blocks else [])
    start = time.perf_counter()
    if main(args) != 0:
        raise RuntimeError("ldm merge failed")
    return {"seconds": time.perf_counter() - start, "peak": peak_rss()}


def run_naive(a: str, b: str, out: str) -> dict[str, float]:
    """The whole-model way: both files read into memory, merged, then saved."""
    from latentdiffusion.checkpoints.safe_io import read_state_dict, save_safetensors

    start = time.perf_counter()
    first = {k: v.clone() for k, v in read_state_dict(Path(a)).items()}
    second = {k: v.clone() for k, v in read_state_dict(Path(b)).items()}
    merged = {
        k: ((0.7 * v.float() + 0.3 * second[k].float()).to(v.dtype) if v.is_floating_point() else v)
        for k, v in first.items()
    }
    save_safetensors(merged, Path(out))
    return {"seconds": time.perf_counter() - start, "peak": peak_rss()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the files (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the files")
    parser.add_argument("--naive", action="store_true", help="also measure the whole-model merge")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="merge-memory-", dir=args.dir))
    try:
        a, b, out = (str(root / f"{name}.safetensors") for name in ("a", "b", "merged"))
        size = write_random(Path(a), 0) + write_random(Path(b), 1) - Path(a).stat().st_size
        cases = {
            "baseline (import latentdiffusion)": "b.baseline()",
            "ldm merge --alpha 0.3": f"b.run_merge({a!r}, {b!r}, {out!r}, False)",
            "ldm merge --block-weights (26 values)": f"b.run_merge({a!r}, {b!r}, {out!r}, True)",
        }
        if args.naive:
            cases["whole models in memory (for comparison)"] = f"b.run_naive({a!r}, {b!r}, {out!r})"
        print(cpu_line())
        print(f"inputs: two random SD 1.5 float16 single files of {size / 2**30:.2f} GiB each")
        print("| case | seconds | peak RSS (GiB) |\n|---|---:|---:|")
        for name, call in cases.items():
            result = in_child(call, "merge_memory")
            print(f"| {name} | {result['seconds']:.1f} | {result['peak'] / 2**30:.2f} |", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
