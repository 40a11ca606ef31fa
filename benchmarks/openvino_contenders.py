"""The OpenVINO contenders of benchmarks/cpu.py (the interface its workers import; see cpu.py).

Each contender is our own model from ``F/ours`` with the U-Net on the OpenVINO backend
(``latentdiffusion.backends.openvino``): converted for each call's shapes on first use (cached under
``F/openvino``), the rest of the pipeline (text encoder, samplers, guidance, decoder) unchanged.
``openvino_unet.py`` measures the same U-Net call alone, against our eager paths. The optimum-intel
contender (diffusers exported by optimum-intel) runs in a side environment: ``optimum_contender.py``.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

import optimum_contender  # this folder is sys.path[0] for cpu.py and its workers
from cpu_worker import CONTEXT_TOKENS
from latentdiffusion.pipelines.deepcache import FAST_CACHE_INTERVAL

OPTIMUM = "diffusers OpenVINO (optimum)"
CACHED = f"ours OpenVINO bf16 + DeepCache {FAST_CACHE_INTERVAL}"
CONTENDERS: dict[str, str] = {
    "ours OpenVINO fp32": "our U-Net through the OpenVINO backend, f32 inference precision",
    "ours OpenVINO bf16": "our U-Net through the OpenVINO backend, bf16 inference-precision hint",
    CACHED: "the bf16 OpenVINO U-Net with DeepCache (its full and shallow calls as two graphs; images only)",
    "ours OpenVINO int8 weights": "the same with int8 weights (nncf.compress_weights), bf16 hint",
    OPTIMUM: "OVStableDiffusionPipeline exported from F/diffusers by optimum-intel (side environment)",
}
PRECISION = {
    "ours OpenVINO fp32": "fp32",
    "ours OpenVINO bf16": "bf16",
    CACHED: "bf16",
    "ours OpenVINO int8 weights": "bf16",
}
CACHE_INTERVAL = {CACHED: FAST_CACHE_INTERVAL}  # DeepCache contenders (cpu.py times their images only)


def available(name: str) -> str | None:
    """None when ``name`` can run here, else why not (one line)."""
    if name not in CONTENDERS:
        return f"unknown contender {name!r}"
    if name == OPTIMUM:
        return optimum_contender.side_problem(optimum_contender.side_python())
    if find_spec("openvino") is None:
        return "openvino not installed (pip install 'latentdiffusion[openvino]')"
    if name == "ours OpenVINO int8 weights" and find_spec("nncf") is None:
        return "nncf not installed"
    return None


def python_for(name: str) -> str | None:
    """The interpreter that runs ``name``'s worker: the side environment's for optimum-intel, else None
    (the driver's own)."""
    return optimum_contender.side_python() if name == OPTIMUM else None


def load(name: str, folder: Path, threads: int) -> Any:
    if name == OPTIMUM:
        return optimum_contender.load(folder, threads)
    import latentdiffusion as ld

    torch.set_num_threads(threads)
    pipe = ld.load(str(Path(folder) / "ours"), precision=PRECISION[name], backend="openvino")
    pipe.backend.cache_dir = Path(folder) / "openvino"
    return Contender(pipe, int8=name.endswith("int8 weights"), cache_interval=CACHE_INTERVAL.get(name))


class Contender:
    def __init__(self, pipe: Any, int8: bool, cache_interval: int | None = None) -> None:
        self.pipe = pipe
        self.int8 = int8
        self.cache_interval = cache_interval
        self.compiled: dict[tuple, Any] = {}

    def unet_call(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if not self.int8:
            with torch.inference_mode():
                return self.pipe.served().unet(x, t, context).float()
        from latentdiffusion.backends.openvino import network_inputs

        inputs = network_inputs(x, t, context, {})
        key = tuple(x.shape)
        if key not in self.compiled:
            self.compiled[key] = _int8_model(self.pipe, inputs)
        return torch.from_numpy(self.compiled[key]([v.numpy() for v in inputs.values()])[0].copy())

    def prepare(self, size: int, guidance_scale: float) -> None:
        """Convert the U-Net for a ``size`` image's calls (or import it from the cache) before the timed
        image, as the optimum-intel contender compiles its static shapes then."""
        if self.int8:
            return
        if self.cache_interval:  # DeepCache's full and shallow graphs: two steps make both calls
            self.pipe.generate(
                "",
                width=size,
                height=size,
                steps=2,
                guidance_scale=guidance_scale,
                cache_interval=self.cache_interval,
            )
            return
        config, batch = self.pipe.config, 2 if guidance_scale > 1 else 1
        side = size // config.autoencoder.downsampling_factor
        x = torch.zeros(batch, config.unet.in_channels, side, side)
        context = torch.zeros(batch, CONTEXT_TOKENS, config.unet.context_dim)
        self.unet_call(x, torch.full((batch,), 500.0), context)

    def generate(
        self,
        prompt: str,
        size: int,
        steps: int,
        latents: torch.Tensor,
        guidance_scale: float = 7.5,
        sampler: str = "dpmpp_2m",
    ) -> Any:
        if self.int8:
            raise RuntimeError("the int8 contender times U-Net calls only")
        return self.pipe.generate(
            prompt,
            width=size,
            height=size,
            steps=steps,
            latents=latents,
            guidance_scale=guidance_scale,
            sampler=sampler,
            cache_interval=self.cache_interval,
        )[0]


def _int8_model(pipe: Any, inputs: dict[str, torch.Tensor]) -> Any:
    import nncf

    from latentdiffusion.backends.openvino import convert_unet

    model = nncf.compress_weights(convert_unet(pipe.unet, inputs))
    return pipe.backend.core.compile_model(model, "CPU", pipe.backend.config())
