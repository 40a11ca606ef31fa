"""The U-Net on OpenVINO: converted per input shape, compiled for the CPU, cached on disk.

``OpenVINORuntime`` (held by a ``Pipeline`` loaded with ``backend="openvino"``) turns the pipeline's torch
U-Net into OpenVINO compiled models, one per input signature (the names, shapes and dtypes of the tensors
a call passes: a guided 512x512 SD 1.5 step is x [2, 4, 64, 64], t [2], context [2, 77, 768]). Each is
made once: ``ov.convert_model`` traces a float32 copy of the U-Net on that call's inputs, the model is fixed
to those static shapes (OpenVINO's CPU kernels are fastest for known shapes) and compiled with the
loading precision as its ``INFERENCE_PRECISION_HINT`` (fp32 or bf16). The compiled model is exported to
``<cache dir>/<key>.blob`` (written atomically); the key hashes the U-Net's weights as they are (merged
LoRAs included), the signature, the precision, the OpenVINO version and the CPU's name, so a later
process with the same model and request shape imports the blob instead of converting again, and any
change of weights, LoRA, shape or precision makes a new entry. Cache folder:
``$LATENTDIFFUSION_OPENVINO_CACHE``, else ``$XDG_CACHE_HOME/latentdiffusion/openvino`` (``~/.cache/...``).

``OpenVINOUNet`` is the drop-in module the pipeline's requests see in place of the U-Net (as
``pipelines.deepcache`` wraps it): the samplers, guidance, img2img, inpainting and the upscaler call it
as they call the U-Net, and it returns the same prediction (float32, cast to the caller's dtype). What the
converted graph cannot take is refused with a message: ControlNet residuals, layer hooks (AnimateDiff's
motion modules), token merging; under ``backend="auto"`` (``strict=False``) such calls run the torch U-Net
instead.

DeepCache (``pipelines.deepcache``) runs on two more graphs per signature: the full call, which also
returns the up-path features its ``FeatureCache`` stores, and the shallow call, which takes them as an
input and recomputes only the skip branch around them (a mode in the cache key: "deepcache-full" or
"deepcache-shallow" and the branch). Weights changed in place after loading (``pipe.load_lora``)
are noticed by their tensors' version counters and the models rebuilt.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.files import atomic_write
from latentdiffusion.models import token_merging
from latentdiffusion.models.layers import set_prepacking

CACHE_ENV = "LATENTDIFFUSION_OPENVINO_CACHE"
FORMAT_VERSION = 1  # bump when the conversion changes what a cached blob contains
HINTS = {"fp32": "f32", "bf16": "bf16"}
# U-Net arguments the converted graph takes (positional order of the traced module), and what it refuses
INPUTS = ("x", "t", "context", "class_labels", "y", "timestep_cond")
REFUSED = {
    "down_residuals": "ControlNet",
    "mid_residual": "ControlNet",
    "after_layer": "motion modules (animate) and other layer hooks",
}
Signature = tuple[tuple[str, tuple[int, ...], str], ...]
Mode = tuple[str, int] | None  # None: the plain U-Net; ("deepcache-full" | "deepcache-shallow", branch)
FULL, SHALLOW = "deepcache-full", "deepcache-shallow"


def import_openvino() -> Any:
    """The ``openvino`` module, or one clear error naming the extra that installs it."""
    try:
        import openvino
    except ImportError:
        raise UserError(
            "the OpenVINO backend needs the openvino package: pip install 'latentdiffusion[openvino]' "
            "(or use --backend torch)"
        ) from None
    return openvino


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "latentdiffusion" / "openvino"


@dataclass
class Event:
    """One compiled model made available: how (converted, or imported from the cache) and its seconds."""

    signature: Signature
    how: str  # "converted" or "cached"
    seconds: float


@dataclass
class OpenVINORuntime:
    """The compiled U-Nets of one pipeline, by input signature, and the on-disk cache behind them."""

    precision: str  # "fp32" or "bf16"
    cache_dir: Path | str | None = None
    strict: bool = True  # refuse calls OpenVINO cannot take; False: run them on the torch U-Net
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.precision not in HINTS:
            raise UserError(f"OpenVINO precision must be one of {', '.join(HINTS)}, got {self.precision!r}")
        self.ov = import_openvino()
        self.core = self.ov.Core()
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else default_cache_dir()
        self.compiled: dict[Signature, Any] = {}
        self._weights: tuple[tuple, str] | None = None  # (fingerprint, digest) of the U-Net last seen
        self._blobs: list[np.memmap] = []  # the mapped cache files imported models were made from

    def wrap(self, components: Components) -> Components:
        """A copy of ``components`` whose U-Net runs here."""
        if "unet" not in components.modules:
            raise UserError(
                f"the OpenVINO backend runs U-Net models (SD 1.x, 2.x, SDXL); {components.name!r} has none "
                "(use --backend torch)"
            )
        return components.with_modules(unet=OpenVINOUNet(components.unet, self))

    @property
    def conversions(self) -> int:
        return sum(event.how == "converted" for event in self.events)

    def config(self) -> dict[str, Any]:
        """Compile (and import) settings: the precision hint and torch's thread count."""
        return {
            "INFERENCE_PRECISION_HINT": HINTS[self.precision],
            "INFERENCE_NUM_THREADS": torch.get_num_threads(),
            "PERFORMANCE_HINT": "LATENCY",
        }

    def model_for(self, unet: nn.Module, inputs: dict[str, torch.Tensor], mode: Mode = None) -> Any:
        """The compiled model for ``inputs``' signature (and DeepCache ``mode``): in memory, else from the
        cache, else converted."""
        digest = self.weights_digest(unet)
        signature = signature_of(inputs)
        if (signature, mode) not in self.compiled:
            start = time.perf_counter()
            path = Path(self.cache_dir) / f"{self.cache_key(digest, signature, mode)}.blob"
            compiled = self._import(path)
            how = "cached"
            if compiled is None:
                compiled, how = self._convert(unet, inputs, mode), "converted"
                atomic_write(path, lambda tmp: _write_blob(compiled, tmp))
            self.compiled[signature, mode] = compiled
            self.events.append(Event(signature, how, time.perf_counter() - start))
        return self.compiled[signature, mode]

    def weights_digest(self, unet: nn.Module) -> str:
        """The hash of ``unet``'s weights, recomputed only when a tensor was replaced or changed in place
        (then the compiled models of the old weights are dropped)."""
        fingerprint = weights_fingerprint(unet)
        if self._weights is None or self._weights[0] != fingerprint:
            self._weights = (fingerprint, weights_digest(unet))
            self.compiled.clear()
        return self._weights[1]

    def cache_key(self, digest: str, signature: Signature, mode: Mode = None) -> str:
        key: dict[str, Any] = {} if mode is None else {"deepcache": list(mode)}
        key |= {
            "format": FORMAT_VERSION,
            "weights": digest,
            "inputs": signature,
            "precision": self.precision,
            "openvino": self.ov.get_version(),
            "cpu": self.core.get_property("CPU", "FULL_DEVICE_NAME"),
        }
        if isa := os.environ.get("OV_CPU_MAX_ISA"):  # a capped instruction set compiles other kernels
            key["cpu max isa"] = isa
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]

    def _import(self, path: Path) -> Any:
        if not path.is_file():
            return None
        # mapped, not read: OpenVINO may keep using the buffer, so it lives as long as the runtime
        # (copy-on-write, since OpenVINO wants a writable buffer; the file never changes)
        blob = np.memmap(path, dtype=np.uint8, mode="c")
        try:
            compiled = self.core.import_model(self.ov.Tensor(blob, shared_memory=True), "CPU", self.config())
        except RuntimeError:  # a blob this OpenVINO cannot read: convert again and replace it
            return None
        self._blobs.append(blob)
        return compiled

    def _convert(self, unet: nn.Module, inputs: dict[str, torch.Tensor], mode: Mode) -> Any:
        return self.core.compile_model(convert_unet(unet, inputs, mode), "CPU", self.config())


class OpenVINOUNet(nn.Module):
    """``unet`` as the pipeline's requests see it, computed by ``runtime``'s compiled models."""

    def __init__(self, unet: nn.Module, runtime: OpenVINORuntime) -> None:
        super().__init__()
        self.unet = unet
        self.runtime = runtime

    @property
    def config(self):
        return self.unet.config

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, *args, **kwargs
    ) -> torch.Tensor:
        named = dict(zip(("class_labels",), args, strict=False)) | kwargs
        cache = named.pop("cache", None)
        refused = [
            REFUSED.get(name, name)
            for name, value in named.items()
            if value is not None and name not in INPUTS
        ] + (["token merging"] if token_merging.active() else [])
        if refused and not self.runtime.strict:  # backend "auto": such calls stay on torch
            return self.unet(x, t, context, cache=cache, **named)
        if refused:
            raise UserError(
                f"{', '.join(sorted(set(refused)))} cannot run on the OpenVINO backend; load the model with "
                "--backend torch (backend='torch') for it"
            )
        inputs = network_inputs(x, t, context, named)
        mode: Mode = None
        if cache is not None:
            reuse = cache.reuse and cache.features is not None
            mode = (SHALLOW if reuse else FULL, cache.branch)
            if reuse:
                inputs["features"] = cache.features.detach().float().cpu().contiguous()
        compiled = self.runtime.model_for(self.unet, inputs, mode)
        arrays = [tensor.numpy() for tensor in inputs.values()]
        outputs = compiled(arrays, share_inputs=True)
        if mode is not None and mode[0] == FULL:  # the features the shallow calls until the next one reuse
            cache.features = torch.from_numpy(np.array(outputs[1]))
        return torch.from_numpy(np.array(outputs[0])).to(x.dtype)


class _Traced(nn.Module):
    """The U-Net as a function of positional tensors, in ``names``' order (what ``convert_model`` traces).
    With a DeepCache ``mode``: the full call returns (output, the features its cache stores), the shallow
    call takes those features as its last input."""

    def __init__(self, unet: nn.Module, names: tuple[str, ...], mode: Mode = None) -> None:
        super().__init__()
        self.unet = unet
        self.names = names
        self.mode = mode

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        named = dict(zip(self.names, tensors, strict=True))
        x, t, context = named.pop("x"), named.pop("t"), named.pop("context")
        if self.mode is None:
            return self.unet(x, t, context, **named)
        from latentdiffusion.models.unet import FeatureCache

        kind, branch = self.mode
        cache = FeatureCache(branch=branch, features=named.pop("features", None), reuse=kind == SHALLOW)
        output = self.unet(x, t, context, cache=cache, **named)
        return output if kind == SHALLOW else (output, cache.features)


def convert_unet(unet: nn.Module, inputs: dict[str, torch.Tensor], mode: Mode = None) -> Any:
    """``unet`` as an OpenVINO model (float32 weights) for exactly ``inputs``' shapes (``network_inputs``;
    for the shallow DeepCache call, the cached ``features`` last) and DeepCache ``mode``."""
    ov = import_openvino()
    example = tuple(inputs.values())
    # the trace fixes shape-dependent Python branches (attention chunking) for these very shapes, which is
    # what the tracer warns about; a signature's graph is only ever run on its own shapes
    with _float32_twin(unet) as plain, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        model = ov.convert_model(_Traced(plain, tuple(inputs), mode), example_input=example)
    model.reshape({i: ov.PartialShape(list(t.shape)) for i, t in enumerate(example)})
    gc.collect()  # a float32 twin of a bf16 U-Net goes now, before compiling
    return model


def network_inputs(
    x: torch.Tensor, t: torch.Tensor | float, context: torch.Tensor, named: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The call's tensors as the converted graph takes them: floating point as contiguous float32 (NumPy
    has no bfloat16), ``t`` one per sample, labels as int64; absent (None) arguments left out."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    inputs = {"x": x, "t": t.expand(x.shape[0]) if t.numel() == 1 else t, "context": context}
    inputs |= {name: named[name] for name in INPUTS[3:] if named.get(name) is not None}
    return {
        name: (v.float() if v.is_floating_point() else v.long()).detach().cpu().contiguous()
        for name, v in inputs.items()
    }


def signature_of(inputs: dict[str, torch.Tensor]) -> Signature:
    return tuple((name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in inputs.items())


def weights_fingerprint(module: nn.Module) -> tuple:
    """Cheap identity of ``module``'s tensors: address, dtype and version counter of each (an in-place
    change such as a merged LoRA bumps the counter; a replaced tensor has another address)."""
    return tuple((t.data_ptr(), t.dtype, _version(t)) for t in chain(module.parameters(), module.buffers()))


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return -1


def weights_digest(module: nn.Module) -> str:
    """BLAKE2b of ``module``'s state dict: every name, dtype, shape and byte."""
    digest = hashlib.blake2b(digest_size=20)
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy() if flat.numel() else b"")
    return digest.hexdigest()


@contextmanager
def _float32_twin(unet: nn.Module) -> Iterator[nn.Module]:
    """``unet`` as a plain float32 network for tracing: itself with oneDNN weight packing (whose ops
    OpenVINO does not convert) switched off meanwhile when its weights are float32 ("fp32-fast"), else a
    float32 copy (bf16) that lives only as long as the trace."""
    if all(
        t.dtype == torch.float32 for t in chain(unet.parameters(), unet.buffers()) if t.is_floating_point()
    ):
        packed = [layer for layer in unet.modules() if getattr(layer, "prepack", False)]
        for layer in packed:
            layer.prepack = False
        try:
            yield unet
        finally:
            for layer in packed:
                layer.prepack = True
        return
    twin = copy.deepcopy(unet).float()
    set_prepacking(twin, False)
    yield twin


def _write_blob(compiled: Any, path: str) -> None:
    stream = compiled.export_model()
    with open(path, "wb") as f:
        f.write(stream.getbuffer())
