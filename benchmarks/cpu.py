"""CPU speed, memory and fidelity of the fast path, beside diffusers, on the SD 1.5 architecture.

    python benchmarks/cpu.py            # everything: about 15-20 min on 2 quiet cores
    python benchmarks/cpu.py --quick    # the headline numbers: about 5-10 min
    python benchmarks/cpu.py --compile  # also our bf16 U-Net under torch.compile (adds its compile time)

Random weights (the architecture's default initialisation, seed 0) are written once as our native folder
and as a diffusers folder, and every configuration then runs in a fresh process that loads them, so each
process's peak RSS is its own:

- ``ours fp32``: ``ld.load(..., precision="fp32")``, the plain reference path;
- ``ours bf16``: ``precision="bf16"``, the CPU fast path (bfloat16 weights packed for oneDNN,
  channels_last, fused attention); ``ours bf16 + DeepCache N`` adds ``cache_interval=N``;
- ``diffusers fp32``: ``StableDiffusionPipeline`` as loaded (its default);
- ``diffusers bf16 + CL``: its best CPU configuration measured in issue 7: ``torch_dtype=bfloat16``
  weights and channels_last U-Net and VAE.

Reported per configuration: seconds per U-Net call (classifier-free guidance batch of 2, 77-token
context; median of ``--repeats`` after a warm-up) at 256 and 512 px; the U-Net's FLOPs (counted by
``torch.utils.flop_counter`` on the meta device) per second, and that rate as a percentage of a 4096x4096
bfloat16 matmul measured in the same process; seconds for a 512x512 image with 20 DPM++ 2M steps end to
end (text encoder, sampling, decoder); the peak RSS of that process (``VmHWM``: whole process, and
during generation alone); and the fast configurations' differences from their own fp32 reference on the
same inputs: max / mean absolute difference of the U-Net output and PSNR of the decoded image.

``--quick`` times U-Net calls at 256 px only, runs the 512 px image for our bf16 configurations only, and
measures image PSNR at 256 px.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from checkpoint_load import peak_rss  # this folder is sys.path[0] for the script and its workers

PROMPT = "a photograph of an astronaut riding a horse"
CONTEXT_TOKENS = 77


@dataclass(frozen=True)
class Config:
    name: str
    side: str  # "ours" or "diffusers"
    precision: str  # "fp32" or "bf16"
    cache_interval: int | None = None
    compile: bool = False

    @property
    def reference(self) -> str:
        return "ours fp32" if self.side == "ours" else "diffusers fp32"


def configs(deepcache: int, compile: bool) -> list[Config]:
    chosen = [
        Config("ours fp32", "ours", "fp32"),
        Config("ours bf16", "ours", "bf16"),
        Config(f"ours bf16 + DeepCache {deepcache}", "ours", "bf16", cache_interval=deepcache),
        Config("diffusers fp32", "diffusers", "fp32"),
        Config("diffusers bf16 + CL", "diffusers", "bf16"),
    ]
    if compile:
        chosen.insert(2, Config("ours bf16 + compile", "ours", "bf16", compile=True))
    return chosen


# ---------------------------------------------------------------------------------------------------
# Measurements that run inside a worker process
# ---------------------------------------------------------------------------------------------------


def matmul_gflops(repeats: int = 3, n: int = 4096) -> list[float]:
    """GFLOP/s of an n x n bfloat16 matmul (2 n^3 FLOPs), one figure per repeat after a warm-up."""
    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        rates.append(2 * n**3 / (time.perf_counter() - start) / 1e9)
    return rates


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def median_seconds(function: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(first call's seconds, median of ``repeats`` further calls)."""
    start = time.perf_counter()
    function()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def load(config: Config, folder: Path) -> Any:
    if config.side == "ours":
        import latentdiffusion as ld

        pipe = ld.load(str(folder / "ours"), precision=config.precision)
        if config.compile:
            from latentdiffusion.pipelines.precision import compile_unet

            compile_unet(pipe.components)
        return pipe
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    pipe = StableDiffusionPipeline.from_pretrained(
        folder / "diffusers", torch_dtype=dtype, safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if dtype == torch.bfloat16:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    return pipe


def latent_shape(preset: str, batch: int, size: int) -> tuple[int, int, int, int]:
    from latentdiffusion.config import get_preset

    config = get_preset(preset)
    f = config.autoencoder.downsampling_factor
    return (batch, config.unet.in_channels, size // f, size // f)


def unet_inputs(
    preset: str, size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from latentdiffusion.config import get_preset

    g = torch.Generator().manual_seed(size)
    x = torch.randn(latent_shape(preset, 2, size), generator=g)
    context = torch.randn(2, CONTEXT_TOKENS, get_preset(preset).unet.context_dim, generator=g)
    return x.to(dtype), torch.tensor([500.0, 500.0]), context.to(dtype)


def unet_call(config: Config, unet: Any, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> Callable:
    @torch.inference_mode()
    def call() -> torch.Tensor:
        if config.side == "ours":
            return unet(x, t, context)
        return unet(x, t, encoder_hidden_states=context).sample

    return call


def unet_task(config: Config, pipe: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Seconds per U-Net call at each size; the outputs are saved for the fidelity comparison."""
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
    result, outputs = {"seconds": {}, "first_call": {}}, {}
    for size in job["sizes"]:
        call = unet_call(config, pipe.unet, *unet_inputs(job["preset"], size, dtype))
        first, median = median_seconds(call, job["repeats"])
        result["first_call"][size], result["seconds"][size] = first, median
        outputs[size] = call().float()
    torch.save(outputs, job["output"])
    return result


def image_task(config: Config, pipe: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Seconds and peak RSS of one image end to end; the image is saved for the fidelity comparison."""
    size, steps, result = job["size"], job["steps"], {}
    latents = torch.randn(latent_shape(job["preset"], 1, size), generator=torch.Generator().manual_seed(1))
    if config.compile:  # compile before the clock starts; its time is reported apart
        from latentdiffusion.pipelines.precision import warm_up

        result["compile_seconds"] = warm_up(pipe.components, size, size)
    reset = reset_peak_rss()
    start = time.perf_counter()
    if config.side == "ours":
        image = pipe.generate(
            PROMPT,
            width=size,
            height=size,
            steps=steps,
            latents=latents,
            cache_interval=config.cache_interval,
        )[0]
    else:
        dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        image = pipe(
            PROMPT, width=size, height=size, num_inference_steps=steps, latents=latents.to(dtype)
        ).images[0]
    seconds = time.perf_counter() - start
    image.save(job["output"])
    return {**result, "seconds": seconds, "peak_rss_generate": peak_rss() if reset else None}


def worker(job: dict[str, Any]) -> None:
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job["task"] == "write":
        write_model(Path(job["folder"]), job["preset"])
        Path(job["result"]).write_text("{}")
        return
    config = Config(**job["config"])
    before = matmul_gflops()
    start = time.perf_counter()
    pipe = load(config, Path(job["folder"]))
    result: dict[str, Any] = {"load_seconds": time.perf_counter() - start}
    task = unet_task if job["task"] == "unet" else image_task
    result.update(task(config, pipe, job))
    result["matmul_gflops"] = statistics.median(before + matmul_gflops(2))
    result["peak_rss"] = peak_rss()
    Path(job["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------


def write_model(folder: Path, preset: str) -> None:
    """Random weights of ``preset`` as our native folder and as a diffusers folder."""
    import latentdiffusion as ld

    pipe = ld.load(f"preset:{preset}")
    pipe.save(folder / "ours", format="native")
    pipe.save(folder / "diffusers", format="diffusers")


def unet_gflop(preset: str, size: int) -> float:
    """GFLOP of one guided U-Net call (batch 2) at ``size`` pixels, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from latentdiffusion.config import get_preset
    from latentdiffusion.models.unet import UNet

    config = get_preset(preset)
    with torch.device("meta"):
        unet = UNet(config.unet)
        x = torch.empty(2, 4, size // 8, size // 8)
        context = torch.empty(2, CONTEXT_TOKENS, config.unet.context_dim)
        with FlopCounterMode(display=False) as counter:
            unet(x, torch.empty(2), context)
    return counter.get_total_flops() / 1e9


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one job in a fresh interpreter; a crash (e.g. out of memory) becomes {"error": ...}."""
    command = [sys.executable, __file__, "--worker", json.dumps(job)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        return {"error": tail[0]}
    return json.loads(Path(job["result"]).read_text())


def psnr(a: Path, b: Path) -> float:
    x = np.asarray(_image(a), dtype=np.float64)
    y = np.asarray(_image(b), dtype=np.float64)
    mse = ((x - y) ** 2).mean()
    return math.inf if mse == 0 else float(10 * np.log10(255**2 / mse))


def _image(path: Path):
    from PIL import Image

    return Image.open(path).convert("RGB")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


class Driver:
    """Plans the jobs of a run, runs them one at a time and keeps their results."""

    def __init__(self, args: argparse.Namespace, folder: Path) -> None:
        self.args, self.folder = args, folder
        self.results: dict[tuple[str, str], dict[str, Any]] = {}

    def job(self, config: Config, task: str, **extra: Any) -> dict[str, Any]:
        stem = self.folder / f"{slug(config.name)}-{task}"
        job = {
            "config": config.__dict__,
            "task": task,
            "folder": str(self.folder),
            "preset": self.args.preset,
            "threads": self.args.threads,
            "result": f"{stem}.json",
            **extra,
        }
        print(f"  {config.name}: {task} ...", file=sys.stderr, flush=True)
        result = run_job(job, self.args.timeout)
        self.results[(config.name, task)] = {**result, "job": job}
        return result

    def run(self, chosen: list[Config]) -> None:
        args, unet_sizes = self.args, [256] if self.args.quick else [256, 512]
        written = self.job(Config("random weights", "ours", "fp32"), "write")  # in a process of its own
        if "error" in written:
            raise SystemExit(f"could not write the random-weight model: {written['error']}")
        for config in chosen:
            if config.cache_interval is None:
                self.job(
                    config, "unet", sizes=unet_sizes, repeats=args.repeats, output=self._path(config, "pt")
                )
        for config in chosen:
            if not args.quick or (config.precision == "bf16" and config.side == "ours"):
                output = self._path(config, "full.png")
                self.job(config, "image", size=args.image_size, steps=args.steps, output=output)
        if args.quick:
            for config in chosen:
                if config.side == "ours":
                    output = self._path(config, "256.png")
                    self.job(config, "fidelity", size=256, steps=args.steps, output=output)

    def _path(self, config: Config, suffix: str) -> str:
        return str(self.folder / f"{slug(config.name)}.{suffix}")


# ---------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------


def speed_table(driver: Driver, chosen: list[Config], flops: dict[int, float]) -> list[str]:
    sizes = sorted(flops)
    head = "| configuration | " + " | ".join(f"U-Net call {s} px, s | GFLOP/s | % of matmul" for s in sizes)
    lines = [head + " | bf16 matmul GFLOP/s | load s |", "|---" * (2 + 3 * len(sizes) + 1) + "|"]
    for config in chosen:
        result = driver.results.get((config.name, "unet"))
        if result is None:
            continue
        if "error" in result:
            lines.append(f"| {config.name} | failed: {result['error']} |")
            continue
        cells = []
        for size in sizes:
            seconds = result["seconds"][str(size)]
            rate = flops[size] / seconds
            cells += [f"{seconds:.3f}", f"{rate:.0f}", f"{100 * rate / result['matmul_gflops']:.0f}%"]
        matmul, load = result["matmul_gflops"], result["load_seconds"]
        lines.append(f"| {config.name} | " + " | ".join(cells) + f" | {matmul:.0f} | {load:.1f} |")
    return lines


def image_table(driver: Driver, chosen: list[Config], task: str) -> list[str]:
    lines = [
        "| configuration | seconds | peak RSS GB (process) | peak RSS GB (generating) | PSNR vs fp32, dB |",
        "|---|---|---|---|---|",
    ]
    for config in chosen:
        result = driver.results.get((config.name, task))
        if result is None:
            continue
        if "error" in result:
            lines.append(f"| {config.name} | failed: {result['error']} |")
            continue
        generating = result.get("peak_rss_generate")
        rss = f"{result['peak_rss'] / 1e9:.2f} | " + (
            "n/a" if generating is None else f"{generating / 1e9:.2f}"
        )
        lines.append(
            f"| {config.name} | {result['seconds']:.1f} | {rss} | {image_psnr(driver, config, task)} |"
        )
    return lines


def image_psnr(driver: Driver, config: Config, task: str) -> str:
    """PSNR against the fp32 reference of the same implementation, and for DeepCache also against the
    same precision without the cache (its own cost); n/a where a run is missing."""
    if config.name == config.reference:
        return "(reference)"
    parts = [_psnr_text(driver, config.name, config.reference, task, "")]
    if config.cache_interval:
        parts.append(_psnr_text(driver, config.name, "ours bf16", task, " vs ours bf16"))
    return ", ".join(part for part in parts if part) or "n/a"


def _psnr_text(driver: Driver, name: str, reference: str, task: str, label: str) -> str:
    own, other = driver.results.get((name, task)), driver.results.get((reference, task))
    if not own or not other or "error" in own or "error" in other:
        return ""
    return f"{psnr(Path(own['job']['output']), Path(other['job']['output'])):.1f}{label}"


def fidelity_table(driver: Driver, chosen: list[Config], sizes: list[int]) -> list[str]:
    lines = ["| configuration | " + " | ".join(f"U-Net {s} px max / mean abs" for s in sizes) + " |"]
    lines.append("|---" * (1 + len(sizes)) + "|")
    for config in chosen:
        if config.name == config.reference or config.cache_interval:
            continue
        own, reference = (
            driver.results.get((config.name, "unet")),
            driver.results.get((config.reference, "unet")),
        )
        if not own or not reference or "error" in own or "error" in reference:
            continue
        a, b = torch.load(own["job"]["output"]), torch.load(reference["job"]["output"])
        cells = [f"{(a[s] - b[s]).abs().max():.4f} / {(a[s] - b[s]).abs().mean():.5f}" for s in sizes]
        lines.append(f"| {config.name} | " + " | ".join(cells) + " |")
    return lines


def compile_lines(driver: Driver, chosen: list[Config]) -> list[str]:
    lines = []
    for config in chosen:
        result = driver.results.get((config.name, "unet"))
        if config.compile and result and "error" not in result:
            for size, first in result["first_call"].items():
                extra = first - result["seconds"][size]
                lines.append(
                    f"{config.name}: first call at {size} px took {first:.1f} s (compile ~{extra:.1f} s)"
                )
    return lines


def header(args: argparse.Namespace) -> list[str]:
    from latentdiffusion.pipelines.precision import cpu_has_bf16

    threads = args.threads or torch.get_num_threads()
    return [
        f"{args.preset} architecture, random weights; torch {torch.__version__}, {threads} threads, "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_has_bf16()}; "
        f"U-Net call = guided batch of 2 with a {CONTEXT_TOKENS}-token context",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="the headline subset (see above)")
    parser.add_argument("--compile", action="store_true", help="add our bf16 U-Net under torch.compile")
    parser.add_argument("--deepcache", type=int, default=3, help="DeepCache interval of its configuration")
    parser.add_argument("--preset", default="sd15")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=512, help="side of the end-to-end image")
    parser.add_argument("--repeats", type=int, default=3, help="timed U-Net calls per size (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per job")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write every raw result here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        chosen = configs(args.deepcache, args.compile)
        driver = Driver(args, folder)
        driver.run(chosen)
        sizes = [256] if args.quick else [256, 512]
        flops = {size: unet_gflop(args.preset, size) for size in sizes}
        report(args, driver, chosen, flops, sizes, time.perf_counter() - started)


def report(
    args: argparse.Namespace,
    driver: Driver,
    chosen: list[Config],
    flops: dict[int, float],
    sizes: list[int],
    seconds: float,
) -> None:
    lines = header(args)
    lines += ["", "U-Net FLOPs per call: " + ", ".join(f"{s} px {flops[s]:.0f} GFLOP" for s in sizes), ""]
    lines += [*speed_table(driver, chosen, flops), ""]
    side = args.image_size
    lines += [f"{args.steps}-step DPM++ 2M image, {side}x{side}, end to end:", ""]
    lines += [*image_table(driver, chosen, "image"), ""]
    if args.quick:
        lines += [
            f"Fidelity at 256x256 ({args.steps} steps):",
            "",
            *image_table(driver, chosen, "fidelity"),
            "",
        ]
    lines += ["U-Net output difference from the fp32 reference (same inputs):", ""]
    lines += [*fidelity_table(driver, chosen, sizes), ""]
    lines += compile_lines(driver, chosen)
    lines += [f"benchmark wall time: {seconds / 60:.1f} min"]
    print("\n".join(lines))
    if args.json:
        raw = {f"{name} / {task}": result for (name, task), result in driver.results.items()}
        args.json.write_text(json.dumps({"flops_gflop": flops, "results": raw}, indent=2, default=str))


if __name__ == "__main__":
    main()
