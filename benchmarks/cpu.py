"""CPU speed, memory and fidelity of every contender on the same weights, in one run.

    python benchmarks/cpu.py --threads 1 --quick      # headline subset at 256 px (+ the one-step image)
    python benchmarks/cpu.py --threads 2              # everything, 256 and 512 px
    python benchmarks/cpu.py --isa avx2 --quick       # emulate an AVX2-only CPU (e.g. Zen 3) on this one

Random weights (the architecture's default initialisation, seed 0) are written once, as our native folder
and as a diffusers folder (``cpu_models.py``); every contender then runs in a fresh process that loads
them (``cpu_worker.py``), so each process's peak RSS is its own. Contenders:

- ``ours fp32``: ``precision="fp32"``, the exact reference every difference below is measured against;
- ``ours fp32-fast``: float32 on oneDNN-packed weights (``auto`` on a CPU without native bfloat16);
- ``ours bf16``: bfloat16, packed (``auto`` on a CPU with native bfloat16; measured only there);
- ``ours default fast``: ``precision="auto"`` + DeepCache N (``ldm generate --deepcache N``), the
  configuration the targets below are about (images only);
- ``diffusers fp32``: ``StableDiffusionPipeline`` as loaded (its default); ``diffusers bf16 + CL``:
  bfloat16 weights, channels_last U-Net and VAE (its best eager CPU configuration; native bf16 only);
- OpenVINO contenders (ours through the OpenVINO backend, fp32 and int8 weights; diffusers exported with
  optimum-intel, whose worker runs in the side environment ``$LDM_OPTIMUM_PYTHON`` names) from
  ``benchmarks/openvino_contenders.py`` where that module and its packages exist.

Reported: seconds per guided U-Net call (batch 2, 77-token context; median of ``--repeats`` after a
warm-up) at 256 and 512 px, its FLOP rate (FLOPs counted by ``torch.utils.flop_counter``) and that rate as
a share of a 2048x2048 matmul in the same process (bfloat16 where the CPU has it natively, else float32);
seconds per image end to end (text encoder, 20 DPM++ 2M guided steps, decoder) at ``--image-size``; SD 2.1
architecture (SD-Turbo's) images at 512 px with 1 and 4 steps, no guidance, tiny decoder (TAESD); each
process's peak RSS (``VmHWM``: whole process, and while generating); the difference of U-Net outputs and
the PSNR of images against ``ours fp32`` on the same inputs. Targets are printed, not asserted.

``--isa avx2`` runs every worker with ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``: oneDNN and
PyTorch's own kernels use AVX2 code only and ``auto`` sees no native bfloat16, an emulation of an AVX2 CPU
such as Zen 3 on a newer one (same caches and clock; the header says it is emulated and prints the ISA
oneDNN reports). ``--quick``: U-Net calls at 256 px only and the 20-step images at 256 px.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpu_worker import CONTEXT_TOKENS, OPENVINO_MODULE, Config, latent_shape, worker
from latentdiffusion.pipelines.deepcache import FAST_CACHE_INTERVAL

REFERENCE = "ours fp32"
DEFAULT_FAST = "ours default fast"
# oneDNN, PyTorch's own kernels, MKL and OpenVINO's CPU plugin each pick their code by their own switch
ISA_ENV = {
    "avx2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "ATEN_CPU_CAPABILITY": "avx2",
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",
        "OV_CPU_MAX_ISA": "AVX2",
    }
}
FEW_STEPS = [1, 4]
TARGET_SPEEDUP, TARGET_PSNR, TARGET_MATMUL_SHARE, TARGET_ONE_STEP = 1.5, 40.0, 0.8, 3.0


def native_bf16(isa: str | None) -> bool:
    from latentdiffusion.pipelines.precision import cpu_has_bf16

    return cpu_has_bf16() and isa is None


def openvino_configs(bf16: bool) -> tuple[list[Config], list[str]]:
    """The OpenVINO contenders that can run here (bf16 ones only with ``bf16``), and a line for each one
    that cannot."""
    try:
        module = __import__(OPENVINO_MODULE)
    except ImportError as error:
        return [], [f"OpenVINO contenders: {OPENVINO_MODULE}.py not importable ({error})"]
    chosen, skipped = [], []
    for name in module.CONTENDERS:
        precision = getattr(module, "PRECISION", {}).get(name, "fp32")
        reason = module.available(name) or (None if bf16 or precision != "bf16" else "no native bfloat16")
        if reason is None:
            python = getattr(module, "python_for", lambda _: None)(name)
            interval = getattr(module, "CACHE_INTERVAL", {}).get(name)
            chosen.append(Config(name, "openvino", precision, cache_interval=interval, python=python))
        else:
            skipped.append(f"{name}: not run ({reason})")
    return chosen, skipped


def configs(args: argparse.Namespace) -> tuple[list[Config], list[str]]:
    bf16 = native_bf16(args.isa)
    chosen = [Config(REFERENCE, "ours", "fp32"), Config("ours fp32-fast", "ours", "fp32-fast")]
    if bf16 or args.emulated_bf16:
        chosen.append(Config("ours bf16", "ours", "bf16"))
    if args.compile:
        chosen.append(Config("ours bf16 + compile", "ours", "bf16", compile=True))
    chosen.append(Config(DEFAULT_FAST, "ours", "auto", cache_interval=args.deepcache))
    chosen.append(Config("diffusers fp32", "diffusers", "fp32"))
    if bf16 or args.emulated_bf16:
        chosen.append(Config("diffusers bf16 + CL", "diffusers", "bf16"))
    notes = [] if bf16 or args.emulated_bf16 else ["bf16 contenders not run: no native bfloat16"]
    if not args.no_openvino:
        extra, skipped = openvino_configs(bf16 or args.emulated_bf16)
        chosen += extra
        notes += skipped
    if args.only:
        notes.append("rows limited by --only: " + ", ".join(args.only))
        chosen = [config for config in chosen if config.name in args.only]
    return chosen, notes


def is_peer(config: Config) -> bool:
    return config.side == "diffusers" or (config.side == "openvino" and config.name.startswith("diffusers"))


# ---------------------------------------------------------------------------------------------------
# The driver


def run_job(
    job: dict[str, Any], timeout: float, env: dict[str, str], script: str = __file__
) -> dict[str, Any]:
    """Run one job in a fresh interpreter (``script --worker JOB``); a crash (e.g. out of memory) becomes
    {"error": ...}."""
    command, env = worker_command(job, env, script)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"error": tail[0]}
    return json.loads(Path(job["result"]).read_text())


def worker_command(
    job: dict[str, Any], env: dict[str, str], script: str = __file__
) -> tuple[list[str], dict[str, str]]:
    """The worker's command line and environment: this interpreter, or the contender's own (a side
    environment, which imports this project from its source tree)."""
    python = job["config"].get("python")
    if not python:
        return [sys.executable, script, "--worker", json.dumps(job)], env
    source = str(Path(__file__).resolve().parents[1] / "src")
    path = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    return [python, script, "--worker", json.dumps(job)], {**env, "PYTHONPATH": path}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


class Driver:
    """Plans the jobs of a run, runs them one at a time and keeps their results."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args, self.folder = args, folder
        self.env = {**os.environ, **ISA_ENV.get(args.isa, {})}
        self.results: dict[tuple[str, str], dict[str, Any]] = {}

    def job(self, config: Config, task: str, **extra: Any) -> dict[str, Any]:
        job = {
            "config": config.__dict__,
            "task": task,
            "folder": str(self.folder),
            "model": self.args.preset,
            "preset": self.args.preset,
            "threads": self.args.threads,
            "clock": "cpu" if self.args.cpu_time else "wall",
            "result": str(self.folder / f"{slug(config.name)}-{task}.json"),
            **extra,
        }
        left = self.args.stop_at - time.time() if self.args.stop_at else math.inf
        if left <= 0:
            result = {"error": "not run: --stop-at reached"}
            self.results[(config.name, task)] = {**result, "job": job}
            return result
        print(f"  {config.name}: {task} ...", file=sys.stderr, flush=True)
        result = run_job(job, min(self.args.timeout, left), self.env)
        self.results[(config.name, task)] = {**result, "job": job}
        return result

    def run(self, chosen: list[Config]) -> None:
        args = self.args
        parts = [args.preset, *([] if args.no_few_step else [args.few_step_preset, "taesd"])]
        parts = [part for part in parts if not (self.folder / part).exists()]  # kept from an earlier run
        written = self.job(Config("random weights", "ours", "fp32"), "write", parts=parts)
        if "error" in written:
            raise SystemExit(f"could not write the random-weight models: {written['error']}")
        for config in chosen:
            if config.cache_interval is None:
                self.job(
                    config,
                    "unet",
                    sizes=unet_sizes(args),
                    repeats=args.repeats,
                    output=self._path(config, "pt"),
                )
        for config in chosen:
            if config.name != REFERENCE and not self._wants_image(config):
                continue
            size = image_size(args)
            output = self._path(config, f"{size}-{{steps}}.png")
            self.job(config, "image", size=size, steps=[args.steps], guidance=7.5, output=output)
        if not args.no_few_step:
            self.few_step(chosen)

    def _wants_image(self, config: Config) -> bool:
        """The reference, the default fast configuration, every DeepCache row and every peer make images;
        the other rows of ours only without --quick (int8 weights: U-Net calls only)."""
        if "int8" in config.name:
            return False
        fast = config.name == DEFAULT_FAST or config.cache_interval is not None
        return fast or is_peer(config) or not self.args.quick

    def few_step(self, chosen: list[Config]) -> None:
        args, tiny = self.args, str(self.folder / "taesd" / "taesd_decoder.safetensors")
        for config in chosen:
            peer = config.side == "diffusers" and (config.precision == "fp32" or not args.quick)
            if config.name != DEFAULT_FAST and not peer:
                continue
            few = Config(config.name, config.side, config.precision)  # no DeepCache for 1-4 steps
            output = self._path(config, "fewstep-{steps}.png")
            extra = {"model": args.few_step_preset, "preset": args.few_step_preset, "tiny_vae": tiny}
            self.job(
                few, "fewstep", size=512, steps=FEW_STEPS, guidance=1.0, output=output, warm_up=True, **extra
            )

    def _path(self, config: Config, suffix: str) -> str:
        return str(self.folder / f"{slug(config.name)}.{suffix}")


def unet_sizes(args: argparse.Namespace) -> list[int]:
    return args.unet_sizes or ([256] if args.quick else [256, 512])


def image_size(args: argparse.Namespace) -> int:
    return args.image_size or (256 if args.quick else 512)


def unet_gflop(preset: str, size: int) -> float:
    """GFLOP of one guided U-Net call (batch 2) at ``size`` pixels, counted on the meta device."""
    return sum(unet_flop_counts(preset, size).values()) / 1e9


def unet_flop_counts(preset: str, size: int) -> dict[Any, int]:
    """FLOPs per operator of one guided U-Net call (batch 2) at ``size`` pixels, on the meta device with
    the plain (unpacked) U-Net, where attention runs as its batched matmuls."""
    from torch.utils.flop_counter import FlopCounterMode

    from latentdiffusion.config import get_preset
    from latentdiffusion.models.unet import UNet

    config = get_preset(preset)
    with torch.device("meta"):
        unet = UNet(config.unet)
        x = torch.empty(latent_shape(preset, 2, size))
        context = torch.empty(2, CONTEXT_TOKENS, config.unet.context_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.empty(2), context)
    return dict(counter.get_flop_counts()["Global"])


def psnr(a: Path, b: Path) -> float:
    """PSNR of two 8-bit image files, dB."""
    from PIL import Image

    return image_psnr(Image.open(a), Image.open(b))


def image_psnr(a, b) -> float:
    """PSNR of two 8-bit images (PIL), dB."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB"), dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return math.inf if mse == 0 else float(10 * np.log10(255**2 / mse))


def dnnl_isa(env: dict[str, str]) -> str:
    """The ISA oneDNN reports it dispatches to under ``env`` (from ONEDNN_VERBOSE), or 'unknown'."""
    code = (  # a packed convolution: always a oneDNN primitive, whatever the size and thread count
        "import torch; x = torch.ones(1, 8, 8, 8).contiguous(memory_format=torch.channels_last); "
        "w = torch.ops.mkldnn._reorder_convolution_weight(torch.ones(8, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1, "
        "[1, 8, 8, 8]); torch.ops.mkldnn._convolution_pointwise(x, w, None, (1, 1), (1, 1), (1, 1), 1, "
        "'none', [], '')"
    )
    verbose = {**env, "ONEDNN_VERBOSE": "1", "DNNL_VERBOSE": "1"}
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=verbose, timeout=120
        )
    except subprocess.TimeoutExpired:
        return "unknown"
    for line in out.stdout.splitlines():
        if "isa:" in line:
            return line.split("isa:", 1)[1].split(",")[0].strip()
    return "unknown"


CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_flags(wanted: tuple[str, ...] = CPU_FLAGS) -> str:
    from latentdiffusion.pipelines.precision import _cpuinfo_flags

    flags = _cpuinfo_flags()
    return " ".join(flag for flag in wanted if flag in flags) or "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the headline subset (see above)")
    parser.add_argument(
        "--isa", choices=sorted(ISA_ENV), default=None, help="emulate a CPU with only this ISA"
    )
    parser.add_argument("--compile", action="store_true", help="add our bf16 U-Net under torch.compile")
    parser.add_argument(
        "--emulated-bf16", action="store_true", help="run bf16 contenders without native bf16"
    )
    parser.add_argument("--no-openvino", action="store_true", help="leave out the OpenVINO contenders")
    parser.add_argument("--only", nargs="+", default=None, metavar="ROW", help="run only these rows (names)")
    parser.add_argument("--no-few-step", action="store_true", help="leave out the 1-4 step images")
    parser.add_argument(
        "--deepcache",
        type=int,
        default=FAST_CACHE_INTERVAL,
        help="DeepCache interval of the default fast config",
    )
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--few-step-preset", default="sd21", help="architecture of the 1-4 step images")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--image-size", type=int, default=None, help="side of the 20-step image (512; --quick 256)"
    )
    parser.add_argument("--unet-sizes", type=int, nargs="+", default=None, help="U-Net call sizes (256 512)")
    parser.add_argument("--repeats", type=int, default=3, help="timed U-Net calls per size (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="time with process CPU seconds (for a machine shared with other jobs)",
    )
    parser.add_argument(
        "--stop-at",
        type=float,
        default=None,
        help="unix time after which no job runs (the report covers the rest)",
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per job")
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="work folder kept for reruns: models, OpenVINO cache (default: temporary)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write every raw result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    from cpu_report import report

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        driver = Driver(args, folder)
        chosen, notes = configs(args)
        driver.run(chosen)
        flops = {size: unet_gflop(args.preset, size) for size in unet_sizes(args)}
        report(args, driver, chosen, flops, notes, time.perf_counter() - started)


if __name__ == "__main__":
    main()
