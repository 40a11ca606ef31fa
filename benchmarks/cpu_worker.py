"""The measurements ``benchmarks/cpu.py`` runs, each in a fresh worker process (one contender, one task).

A contender is loaded from the work folder the driver wrote (the same random weights for everybody) and
then measured: seconds per guided U-Net call at each size (median after a warm-up; the output is saved
for the comparison with the fp32 reference), or seconds for whole images (the images are saved for PSNR),
and the process's peak RSS. The matmul rates that the U-Net's FLOP rate is compared with are measured in
the same process, before and after the task.
"""

from __future__ import annotations

import importlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from checkpoint_load import peak_rss  # this folder is sys.path[0] for the script and its workers

PROMPT = "a photograph of an astronaut riding a horse"
CONTEXT_TOKENS = 77
MATMUL_SIDE = 2048  # 17 GFLOP: about a second on one core, long enough to time
# what every worker times with: wall seconds, or (``--cpu-time``) the process's CPU seconds, which on a
# machine whose cores other jobs share compare contenders fairly where wall time does not
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]
OPENVINO_MODULE = "openvino_contenders"  # benchmarks/openvino_contenders.py (optional)


@dataclass(frozen=True)
class Config:
    name: str
    side: str  # "ours", "diffusers" or "openvino" (a contender of ``OPENVINO_MODULE``)
    precision: str  # ours: a ``pipelines.precision`` name; diffusers: "fp32" or "bf16"
    cache_interval: int | None = None
    compile: bool = False
    python: str | None = None  # the interpreter of its worker (a side environment); None: the driver's


# ---------------------------------------------------------------------------------------------------
# timing helpers


def matmul_gflops(dtype: torch.dtype, repeats: int = 3, n: int = MATMUL_SIDE) -> list[float]:
    """GFLOP/s of an n x n matmul in ``dtype`` (2 n^3 FLOPs), one figure per repeat after a warm-up."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    rates = []
    for _ in range(repeats):
        start = clock()
        a @ b
        rates.append(2 * n**3 / (clock() - start) / 1e9)
    return rates


def matmul_rates(native_bf16: bool) -> dict[str, list[float]]:
    rates = {"fp32": matmul_gflops(torch.float32)}
    if native_bf16:
        rates["bf16"] = matmul_gflops(torch.bfloat16)
    return rates


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def median_seconds(
    function: Callable[[], object], repeats: int, timer: Callable[[], float] | None = None
) -> tuple[float, float]:
    """(first call's seconds, median of ``repeats`` further calls) by ``timer`` (default: the job's clock)."""
    timer = timer or clock
    start = timer()
    function()
    first = timer() - start
    times = []
    for _ in range(repeats):
        start = timer()
        function()
        times.append(timer() - start)
    return first, statistics.median(times)


# ---------------------------------------------------------------------------------------------------
# contenders


class Ours:
    def __init__(self, config: Config, folder: Path, tiny_vae: Path | None = None) -> None:
        import latentdiffusion as ld
        from latentdiffusion.pipelines.precision import precision_of

        self.config = config
        self.pipe = ld.load(str(folder / "ours"), precision=config.precision, tiny_vae=tiny_vae)
        self.resolved = precision_of(self.pipe.components)
        if config.compile:
            from latentdiffusion.pipelines.precision import compile_unet

            compile_unet(self.pipe.components)

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.components.dtype

    def unet_call(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.pipe.unet(x.to(self.dtype), t, context.to(self.dtype)).float()

    def generate(self, prompt: str, size: int, steps: int, latents: torch.Tensor, guidance_scale: float):
        return self.pipe.generate(
            prompt,
            width=size,
            height=size,
            steps=steps,
            latents=latents,
            guidance_scale=guidance_scale,
            cache_interval=self.config.cache_interval,
        )[0]


class Diffusers:
    def __init__(self, config: Config, folder: Path, tiny_vae: Path | None = None) -> None:
        from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

        self.dtype = torch.bfloat16 if config.precision == "bf16" else torch.float32
        self.resolved = config.precision
        options = {"torch_dtype": self.dtype, "safety_checker": None, "requires_safety_checker": False}
        if tiny_vae is not None:
            from diffusers import AutoencoderTiny

            options["vae"] = AutoencoderTiny.from_pretrained(tiny_vae.parent / "taesd_diffusers").to(
                self.dtype
            )
        pipe = StableDiffusionPipeline.from_pretrained(folder / "diffusers", **options)
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        if self.dtype == torch.bfloat16:  # its best CPU configuration (measured in earlier runs)
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        self.pipe = pipe

    def unet_call(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.pipe.unet(x.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype)).sample
        return out.float()

    def generate(self, prompt: str, size: int, steps: int, latents: torch.Tensor, guidance_scale: float):
        latents = latents.to(self.dtype)
        options = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "latents": latents}
        return self.pipe(prompt, width=size, height=size, **options).images[0]


def openvino_module() -> Any:
    return importlib.import_module(OPENVINO_MODULE)


def load(config: Config, folder: Path, threads: int | None, tiny_vae: Path | None = None) -> Any:
    if config.side == "ours":
        return Ours(config, folder, tiny_vae)
    if config.side == "diffusers":
        return Diffusers(config, folder, tiny_vae)
    contender = openvino_module().load(config.name, folder, threads or torch.get_num_threads())
    if getattr(contender, "resolved", None) is None:  # else the precision the contender found it runs
        contender.resolved = config.precision
    return contender


# ---------------------------------------------------------------------------------------------------
# tasks


def latent_shape(preset: str, batch: int, size: int) -> tuple[int, int, int, int]:
    from latentdiffusion.config import get_preset

    config = get_preset(preset)
    f = config.autoencoder.downsampling_factor
    return (batch, config.unet.in_channels, size // f, size // f)


def unet_inputs(preset: str, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from latentdiffusion.config import get_preset

    g = torch.Generator().manual_seed(size)
    x = torch.randn(latent_shape(preset, 2, size), generator=g)
    context = torch.randn(2, CONTEXT_TOKENS, get_preset(preset).unet.context_dim, generator=g)
    return x, torch.tensor([500.0, 500.0]), context


def unet_task(contender: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Seconds per guided U-Net call at each size; the outputs are saved for the fidelity comparison."""
    result, outputs = {"seconds": {}, "first_call": {}}, {}
    for size in job["sizes"]:
        inputs = unet_inputs(job["preset"], size)

        @torch.inference_mode()
        def call(inputs=inputs) -> torch.Tensor:
            return contender.unet_call(*inputs)

        first, median = median_seconds(call, job["repeats"])
        result["first_call"][size], result["seconds"][size] = first, median
        outputs[size] = call()
    torch.save(outputs, job["output"])
    return result


def image_task(contender: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Seconds of images end to end for each step count in ``job["steps"]`` (the first one also gives the
    peak RSS while generating); the images are saved for PSNR."""
    size, result = job["size"], {"seconds": {}}
    latents = torch.randn(latent_shape(job["preset"], 1, size), generator=torch.Generator().manual_seed(1))
    if getattr(getattr(contender, "config", None), "compile", False):
        from latentdiffusion.pipelines.precision import warm_up

        result["compile_seconds"] = warm_up(contender.pipe.components, size, size)
    if hasattr(contender, "prepare"):  # static shapes compiled for this size, outside the timing
        start = clock()
        contender.prepare(size, job["guidance"])
        result["prepare_seconds"] = clock() - start
    if job.get("warm_up"):  # few-step images: a first, untimed image (first-call packing, allocation)
        contender.generate(PROMPT, size, 1, latents, guidance_scale=job["guidance"])
    reset = reset_peak_rss()
    for steps in job["steps"]:
        start = clock()
        image = contender.generate(PROMPT, size, steps, latents, guidance_scale=job["guidance"])
        result["seconds"][steps] = clock() - start
        image.save(job["output"].format(steps=steps))
        if steps == job["steps"][0]:
            result["peak_rss_generate"] = peak_rss() if reset else None
    return result


def worker(job: dict[str, Any]) -> None:
    global clock
    clock = CLOCKS[job.get("clock", "wall")]
    torch.manual_seed(0)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    if job["task"] == "write":
        from cpu_models import write_models

        write_models(Path(job["folder"]), job["parts"])
        Path(job["result"]).write_text("{}")
        return
    from latentdiffusion.pipelines.precision import cpu_has_bf16

    config = Config(**job["config"])
    before = matmul_rates(cpu_has_bf16())
    start = clock()
    folder = Path(job["folder"]) / job.get("model", "")
    tiny_vae = Path(job["tiny_vae"]) if job.get("tiny_vae") else None
    contender = load(config, folder, job.get("threads"), tiny_vae)
    result: dict[str, Any] = {"load_seconds": clock() - start, "resolved": contender.resolved}
    task = unet_task if job["task"] == "unet" else image_task
    result.update(task(contender, job))
    after = matmul_rates(cpu_has_bf16())
    result["matmul_gflops"] = {k: statistics.median(v + after[k]) for k, v in before.items()}
    result["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    result["peak_rss"] = peak_rss()
    Path(job["result"]).write_text(json.dumps(result))
