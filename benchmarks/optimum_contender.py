"""diffusers exported to OpenVINO by optimum-intel (``OVStableDiffusionPipeline``, FastSD CPU's route), a
contender of ``benchmarks/cpu.py`` (listed in ``openvino_contenders.py``).

optimum-intel 2.2 needs transformers < 5.6 and huggingface-hub < 1.22, which this project's environment
cannot hold (it pins transformers 5.23), so this contender's worker runs in a side environment:
``$LDM_OPTIMUM_PYTHON`` names its interpreter (how to build it: docs/benchmarks.md), and the driver
starts the worker there with this repository's ``src`` on ``PYTHONPATH``. Only the standard library is
imported at module level: the driver's environment checks the side one without importing optimum.

The diffusers folder the driver wrote (``F/<preset>/diffusers``) is exported once, offline, to
``F/<preset>/optimum-openvino`` (float32 weights, no weight compression). U-Net calls go to the exported
U-Net reshaped to each call's static shapes; images go through the pipeline reshaped to the image's
size, with DPMSolverMultistepScheduler (DPM++ 2M) and the driver's initial latents, like the
``diffusers`` rows. OpenVINO picks its own inference precision (bf16 on a CPU with native bfloat16,
else f32), as FastSD CPU leaves it; the row's precision column reports which.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

PYTHON_VARIABLE = "LDM_OPTIMUM_PYTHON"
EXPORT_FOLDER = "optimum-openvino"
PROBE = "from optimum.intel import OVStableDiffusionPipeline"  # what the side environment must import
OV_PRECISIONS = {"bf16": "bf16", "f16": "fp16", "f32": "fp32"}


def side_python(environ: dict[str, str] | None = None) -> str | None:
    """The side environment's interpreter named by ``$LDM_OPTIMUM_PYTHON``, or None."""
    return (os.environ if environ is None else environ).get(PYTHON_VARIABLE) or None


def side_problem(python: str | None, timeout: float = 300) -> str | None:
    """None when ``python`` imports optimum-intel's pipeline, else why not (one line)."""
    if python is None:
        return (
            f"no side environment: set {PYTHON_VARIABLE} to the python of a venv with optimum-intel "
            "(docs/benchmarks.md); optimum-intel 2.2 needs transformers < 5.6, this project pins 5.23"
        )
    if not (Path(python).is_file() and os.access(python, os.X_OK)):
        return f"{PYTHON_VARIABLE}={python}: no such interpreter"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    try:
        done = subprocess.run([python, "-c", PROBE], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"{PYTHON_VARIABLE}={python}: importing optimum-intel took over {timeout:.0f} s"
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
        return f"{PYTHON_VARIABLE}={python} cannot import optimum-intel's pipeline: {lines[-1]}"
    return None


def export(diffusers_folder: Path, target: Path) -> Path:
    """``target``, exported from ``diffusers_folder`` by optimum-intel unless it already exists (the
    export is written beside it and renamed, so a crash leaves no half folder)."""
    if (target / "model_index.json").exists():
        return target
    from optimum.intel import OVStableDiffusionPipeline

    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe = OVStableDiffusionPipeline.from_pretrained(
        diffusers_folder, export=True, compile=False, load_in_8bit=False, local_files_only=True
    )
    pipe.save_pretrained(partial)
    partial.rename(target)
    return target


def load(folder: Path, threads: int, precision: str | None = None) -> OptimumContender:
    """The pipeline exported from ``folder/diffusers``, compiled for ``threads`` threads with OpenVINO's
    default inference precision or ``precision`` ("fp32", "bf16") as the hint."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # read when huggingface_hub is first imported
    import openvino as ov
    import torch
    from diffusers import DPMSolverMultistepScheduler
    from optimum.intel import OVStableDiffusionPipeline

    torch.set_num_threads(threads)
    exported = export(Path(folder) / "diffusers", Path(folder) / EXPORT_FOLDER)
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = {v: k for k, v in OV_PRECISIONS.items()}[precision]
    pipe = OVStableDiffusionPipeline.from_pretrained(
        exported, compile=False, ov_config=config, local_files_only=True
    )
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    core = ov.Core()
    hint = (
        config.get("INFERENCE_PRECISION_HINT")
        or core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    )
    return OptimumContender(pipe, core, config, OV_PRECISIONS.get(hint, hint))


class OptimumContender:
    def __init__(self, pipe: Any, core: Any, config: dict[str, Any], resolved: str) -> None:
        self.pipe, self.core, self.config, self.resolved = pipe, core, config, resolved
        self.compiled: dict[tuple, Any] = {}
        self.image_size: int | None = None

    def unet_call(self, x: Any, t: Any, context: Any) -> Any:
        """The exported U-Net on (x, t, context); its graph takes one timestep for the whole batch."""
        import numpy as np
        import torch

        if not bool((t == t[0]).all()):
            raise ValueError("optimum-intel's U-Net takes one timestep for the whole batch")
        inputs = {
            "sample": x.float().numpy(),
            "timestep": np.array([int(t[0])], dtype=np.int64),
            "encoder_hidden_states": context.float().numpy(),
        }
        key = tuple(x.shape) + tuple(context.shape)
        if key not in self.compiled:
            self.compiled[key] = self._static_unet(inputs)
        return torch.from_numpy(self.compiled[key](inputs)["out_sample"].copy())

    def _static_unet(self, inputs: dict[str, Any]) -> Any:
        model = self.pipe.unet.model.clone()
        model.reshape({name: list(array.shape) for name, array in inputs.items()})
        return self.core.compile_model(model, "CPU", self.config)

    def prepare(self, size: int, guidance_scale: float) -> None:
        """Reshape the pipeline to static shapes for ``size`` and compile it, as optimum-intel recommends
        for the CPU (the worker does this before timing images)."""
        if size == self.image_size:
            return
        batch = 1 if guidance_scale > 1 else -1  # its reshape doubles the U-Net's batch for guidance
        self.pipe.reshape(batch_size=batch, height=size, width=size, num_images_per_prompt=1)
        self.pipe.compile()
        self.image_size = size

    def generate(
        self, prompt: str, size: int, steps: int, latents: Any, guidance_scale: float = 7.5, **_: Any
    ) -> Any:
        self.prepare(size, guidance_scale)
        options = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "latents": latents}
        return self.pipe(prompt, height=size, width=size, **options).images[0]
