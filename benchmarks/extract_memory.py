"""Peak memory and seconds of ``ldm extract-lora`` on two full-size float16 single files on this CPU.

    python benchmarks/extract_memory.py [--model sd15|sdxl] [--rank 16] [--conv-rank 0] [--dir DIR]
                                        [--keep] [--whole]

(``--keep --dir DIR`` keeps the files in DIR and reuses them next time.)

Writes two random-weight single files (N(0, 0.02) float16, one tensor at a time) with every key and
shape of the model's single-file layout: SD 1.5 (1.07 B parameters, about 2.0 GiB each) or SDXL base
(U-Net, both text encoders and the autoencoder: 3.5 B parameters, about 6.5 GiB each). Then, each in a
fresh process: the baseline (``import latentdiffusion`` and torch) and ``ldm extract-lora TUNED BASE
--rank R --conv-rank C`` as the command line runs it (exact SVD of every layer's difference; two
independent random files make every difference full-rank, which costs an SVD what a real fine-tune's
does). With ``--whole``, the floor of the previous whole-model way: both files loaded as Components in
float32, nothing extracted. Reports seconds, the number of LoRA layers written and the peak RSS
(``VmHWM``). The files are deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from checkpoint_load import cpu_line, in_child, peak_rss  # this folder is sys.path[0] for the script

PRESETS = {"sd15": "sd15", "sdxl": "sdxl", "tiny": "tiny"}  # tiny: a quick check of the script


def layout_shapes(preset: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of the preset's single file, from its networks built on the meta device."""
    from latentdiffusion.checkpoints.single_file import single_file_state
    from latentdiffusion.components import Components
    from latentdiffusion.config import PRESETS as MODELS
    from latentdiffusion.families import family_of

    config = MODELS[preset]
    with torch.device("meta"):
        modules = family_of(config).build(config)
    state = single_file_state(Components(config, modules, {}, preset))
    return {
        k: (tuple(v.shape), torch.float16 if v.is_floating_point() else v.dtype) for k, v in state.items()
    }


def write_random(path: Path, preset: str, seed: int) -> int:
    """A random single file of ``preset``, written one tensor at a time; returns its size in bytes."""
    import json

    from latentdiffusion.checkpoints.safetensors_stream import TensorSpec, write_streamed
    from latentdiffusion.checkpoints.single_file import CONFIG_METADATA
    from latentdiffusion.config import PRESETS as MODELS

    generator = torch.Generator().manual_seed(seed)
    specs = [TensorSpec(k, dtype, shape) for k, (shape, dtype) in layout_shapes(preset).items()]

    def make(spec: TensorSpec) -> torch.Tensor:
        if not spec.dtype.is_floating_point:
            return torch.zeros(spec.shape, dtype=spec.dtype)
        return (torch.randn(spec.shape, generator=generator) * 0.02).to(spec.dtype)

    metadata = {CONFIG_METADATA: json.dumps(MODELS[preset].to_dict())}  # as ``ldm convert`` writes it
    write_streamed(path, specs, make, metadata)
    return path.stat().st_size


def baseline() -> dict[str, float]:
    import latentdiffusion  # noqa: F401

    return {"seconds": 0.0, "peak": peak_rss(), "layers": 0}


def run_extract(tuned: str, base: str, out: str, rank: int, conv_rank: int) -> dict[str, float]:
    """Runs in the child process: ``ldm extract-lora`` as the command line runs it."""
    from latentdiffusion.checkpoints.safe_io import read_safetensors_header
    from latentdiffusion.cli.main import main

    args = ["extract-lora", tuned, base, "-o", out, "--rank", str(rank), "--conv-rank", str(conv_rank)]
    start = time.perf_counter()
    if main(args) != 0:
        raise RuntimeError("ldm extract-lora failed")
    seconds = time.perf_counter() - start
    layers = sum(k.endswith(".alpha") for k in read_safetensors_header(Path(out)).entries)
    return {"seconds": seconds, "peak": peak_rss(), "layers": layers}


def run_whole(tuned: str, base: str) -> dict[str, float]:
    """The previous way's floor: both models loaded whole in float32 (what it did before any SVD)."""
    from latentdiffusion.pipelines.loading import load_components

    start = time.perf_counter()
    models = [load_components(path, dtype=torch.float32) for path in (tuned, base)]
    assert len(models) == 2
    return {"seconds": time.perf_counter() - start, "peak": peak_rss(), "layers": 0}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=PRESETS, default="sd15")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--conv-rank", type=int, default=0, help="0: transformer layers only (kohya's default)"
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="where to write the files (default: a temp dir)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the files (and reuse kept ones)")
    parser.add_argument("--whole", action="store_true", help="also measure loading both models whole")
    args = parser.parse_args()
    if args.keep and args.dir is not None:
        root = args.dir
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="extract-memory-", dir=args.dir))
    try:
        tuned, base, out = (str(root / f"{args.model}-{n}.safetensors") for n in ("tuned", "base", "lora"))
        for path, seed in ((tuned, 1), (base, 0)):
            if not Path(path).is_file():
                write_random(Path(path), PRESETS[args.model], seed)
        size = Path(base).stat().st_size
        cases = {"baseline (import latentdiffusion)": "b.baseline()"}
        flags = f"--rank {args.rank} --conv-rank {args.conv_rank}"
        cases[f"ldm extract-lora {flags}"] = (
            f"b.run_extract({tuned!r}, {base!r}, {out!r}, {args.rank}, {args.conv_rank})"
        )
        if args.whole:
            cases["both models loaded whole in float32 (previous way, before any SVD)"] = (
                f"b.run_whole({tuned!r}, {base!r})"
            )
        print(cpu_line())
        print(f"inputs: two random {args.model} float16 single files of {size / 2**30:.2f} GiB each")
        print("| case | seconds | LoRA layers | peak RSS (GiB) |\n|---|---:|---:|---:|")
        for name, call in cases.items():
            result = in_child(call, "extract_memory")
            row = f"| {name} | {result['seconds']:.1f} | {result['layers']} | {result['peak'] / 2**30:.2f} |"
            print(row, flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
