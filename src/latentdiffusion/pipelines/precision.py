"""Numerical precision and the CPU fast paths: ``precision="fp32" | "fp32-fast" | "bf16" | "auto"``.

"bf16" runs the U-Net and the autoencoder with bfloat16 weights and activations (Kalamkar et al.
2019, "A Study of BFLOAT16 for Deep Learning Training": float32's exponent range, 8 bits of
mantissa), convolutions on channels_last activations with weights pre-packed for oneDNN
(``models.layers.set_prepacking``), attention through SDPA's fused CPU kernel. What stays float32,
and why (measured on the SD 1.5 architecture, see docs/benchmarks.md):

- the timestep-embedding MLP: tiny, and its sinusoid input needs more than 8 mantissa bits;
- the sampler state, the guidance arithmetic and the x0 conversion (``Denoiser`` casts the network
  output back to the float32 latent), and the decoded image (cast to float32 before 8-bit rounding);
- the CLIP text encoders: they run once per prompt, so bfloat16 would save little worth its error
  (a one-step image is the exception: there they are an eighth of the time); their linear layers run
  on packed float32 weights, as fp32-fast's do;
- GroupNorm / LayerNorm statistics and the attention softmax: PyTorch's CPU kernels already
  accumulate bfloat16 inputs in float32, so nothing needs upcasting by hand.

"fp32-fast" keeps every number float32 and runs the denoising network's, the autoencoder's and the
CLIP text encoders' convolutions and linear layers on weights pre-packed for oneDNN, on channels_last
activations (a packed convolution takes and gives channels_last, so the layout follows from the first
one; the weights themselves stay as loaded). A plain float32 convolution reorders its weight on every
call, and MKL's sgemm on an unpacked weight was slower than oneDNN's on a packed one
(docs/benchmarks.md). Its results
differ from "fp32" only by summation order (about 1e-6 relative). The packed copies (as large as the
weights: 3.4 GB for SD 1.5's U-Net) are made on the first call; the float32 weights' file pages are then
handed back (``page_out_packed_weights``), so the process holds one copy, not two.

"auto" picks bf16 on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16), fp32-fast on
any other CPU and fp32 on other devices; "fp32" is the plain reference path (float32 weights as loaded,
no packing, PyTorch's default layout).

Memory for large text encoders (SD3's T5-XXL, 4.7 B parameters: 9.5 GB in 16 bits, 19 GB in float32):

- under "fp32" its weights stay in the file's 16-bit dtype and each layer casts its own weight to float32
  inside its forward (``upcast_per_layer``), one layer at a time: the same numbers as a float32 copy of
  the same weights, at half the memory (measured in docs/benchmarks.md; the MMDiT, 10 GB in float32,
  fits beside it and runs as a plain float32 network);
- under either precision, when its weights are views of a memory-mapped file, each layer hands its file
  pages back to the kernel right after it has run (``page_out_after_use``): the encoder streams through
  memory one layer at a time while it encodes, and holds nothing once the prompts are encoded. The next
  prompt reads the pages again (from the page cache, or from disk at its speed).
"""

from __future__ import annotations

import ctypes
import os
import time
from functools import cache, partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.models.layers import is_prepacked, set_prepacking

PRECISIONS = ("fp32", "fp32-fast", "bf16", "auto")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bfloat16 arithmetic
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA values) below its first bfloat16 instructions (AVX512_CORE_BF16)
ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")
DTYPES = {"fp32": torch.float32, "fp32-fast": torch.float32, "bf16": torch.bfloat16}
MADV_PAGEOUT = 21  # linux/mman.h
# the denoising networks' embedding MLPs, which a bf16 model keeps in float32 (U-Net; SD3's MMDiT)
FLOAT32_PARTS = ("time_embedding", "add_embedding", "time_embed", "pooled_embed")
BF16_TEXT_ROLES = ("text_encoder_3",)  # T5-XXL (4.7 B) trained in bfloat16: float32 would take 19 GB
# networks that, under fp32, keep 16-bit stored weights and upcast layer by layer (``upcast_per_layer``),
# and that hand their file pages back after each layer runs (``page_out_after_use``)
STREAMED_ROLES = ("text_encoder_3",)
STORAGE_DTYPES = (torch.float16, torch.bfloat16)
WARM_UP_TOKENS = 77  # one CLIP chunk of context


@cache
def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16), not by emulation, and
    oneDNN is not capped below it (``ONEDNN_MAX_CPU_ISA``, e.g. AVX2: then bf16 would be emulated)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    if cap.upper() in ISAS_WITHOUT_BF16:
        return False
    flags = _cpuinfo_flags()
    if flags:
        return any(flag in flags for flag in BF16_CPU_FLAGS)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # where there is no /proc/cpuinfo
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def resolve_precision(precision: str, device: str | torch.device | None = None) -> str:
    """ "fp32", "fp32-fast" or "bf16" for ``precision`` on ``device`` (default CPU): "auto" is bf16 on a
    CPU with native bfloat16, fp32-fast on any other CPU, fp32 on other devices."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if torch.device(device or "cpu").type != "cpu":
        return "fp32"
    return "bf16" if cpu_has_bf16() else "fp32-fast"


def apply_precision(components: Components, precision: str) -> Components:
    """Convert ``components`` in place to a resolved precision ("fp32", "fp32-fast" or "bf16"); returns
    them.

    bf16 converts the denoising network (U-Net or MMDiT) and the autoencoder, and SD3's T5 (trained in
    bfloat16; 19 GB in float32); the CLIP text encoders and the network's small embedding MLPs
    (``FLOAT32_PARTS``) stay float32: they run once per image or step, and a sinusoid of a large timestep
    loses its phase in bfloat16. fp32 makes everything float32 except the weights of ``STREAMED_ROLES``
    stored in 16 bits, which stay so and are upcast layer by layer (``upcast_per_layer``). Under both, the
    ``STREAMED_ROLES`` hand their file pages back after each layer runs (``page_out_after_use``).
    fp32-fast is fp32 with the convolution and linear weights of the denoising network, the
    autoencoder and the CLIP text encoders packed for oneDNN on the CPU (``models.layers.set_prepacking``;
    bf16 packs the same modules)."""
    if precision not in DTYPES:
        choices = ", ".join(DTYPES)
        raise UserError(f"precision must be one of {choices} here (resolve 'auto' first), got {precision!r}")
    # The file pages each conversion has read are handed back to the kernel as it goes (``FilePages``),
    # so they never add up to the whole file beside the converted copy in this process.
    pages = FilePages(*components.modules.values())
    if precision == "bf16":
        _to_bfloat16(components, pages)
    else:
        _to_float32(components, pages)
        packs = precision == "fp32-fast" and components.device.type == "cpu"
        for module in _packed_modules(components):
            set_prepacking(module, packs)
            if packs:
                page_out_packed_weights(module)
    for role in STREAMED_ROLES:
        if role in components.modules:
            page_out_after_use(components.modules[role])
    return components


def _to_float32(components: Components, pages: FilePages) -> None:
    for role, module in components.modules.items():
        if role in STREAMED_ROLES:
            upcast_per_layer(module)
            continue
        for child in module.children():
            child.float()  # a float32 file's weights stay views of the file: no copy
            pages.release()
        module.float()
        set_prepacking(module, False)


def _to_bfloat16(components: Components, pages: FilePages) -> None:
    # Every part gets memory of its own (the float32 parts a copy), so that nothing views a memory-mapped
    # weight file any more and its mapping is released (T5's weights, already bfloat16, stay views).
    network = components.network
    for name, child in network.named_children():
        if name not in FLOAT32_PARTS:
            child.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
            pages.release()
    for name, buffer in network.named_buffers(recurse=False):  # SD3's positional embedding
        setattr(network, name, buffer.to(torch.bfloat16))
    components.autoencoder.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    for role in BF16_TEXT_ROLES:
        if role in components.modules:
            components.modules[role].to(torch.bfloat16)
            pages.release()
    network_parts = [child for name, child in network.named_children() if name in FLOAT32_PARTS]
    skip = (components.family.network_role, "autoencoder", *BF16_TEXT_ROLES)
    text_encoders = [m for role, m in components.modules.items() if role not in skip]
    for module in (*network_parts, *text_encoders):
        _own_float32_copy(module)
    pages.release()
    for module in _packed_modules(components):
        set_prepacking(module, components.device.type == "cpu")


def _packed_modules(components: Components) -> list[nn.Module]:
    """What fp32-fast and bf16 run on packed weights: the denoising network, the autoencoder and the
    float32 CLIP text encoders (an SD 2.1 prompt 0.44 -> 0.27 s on two Zen 4 cores,
    ``benchmarks/one_step_image.py``; the same numbers to summation order); T5 is left as it is
    (streamed layer by layer under fp32, bfloat16 under bf16)."""
    return [module for role, module in components.modules.items() if role not in STREAMED_ROLES]


class FilePages:
    """The memory-mapped weight files under some modules' tensors, whose resident pages ``release`` hands
    back to the kernel (``madvise(MADV_PAGEOUT)``, Linux 5.4+): clean file pages are dropped and read again
    from the file if touched, pages a process has changed are kept (or swapped), so it is always safe.
    Elsewhere (another OS, an older kernel) it does nothing."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers()) if t.device.type == "cpu"]
        storages = {(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) for t in tensors}
        files = _file_mappings()
        self.ranges = [(a, n) for a, n in storages if any(lo <= a and a + n <= hi for lo, hi in files)]

    def release(self) -> None:
        if not self.ranges:
            return
        libc, page = ctypes.CDLL(None, use_errno=True), os.sysconf("SC_PAGE_SIZE")
        for address, size in self.ranges:
            start = address - address % page
            libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + size - start), MADV_PAGEOUT)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) addresses of this process's file-backed memory mappings (none where unknown)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode and a path
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


class UpcastLinear(nn.Linear):
    """``nn.Linear`` whose parameters stay in their stored (16-bit) dtype and are cast to the input's dtype
    inside ``forward``: the float32 product of the stored weights, with only this layer's float32 copy alive
    (and only while it runs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class UpcastConv2d(nn.Conv2d):
    """``nn.Conv2d`` computing in the input's dtype from weights kept in their stored dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, self.weight.to(x.dtype), bias)


class UpcastEmbedding(nn.Embedding):
    """``nn.Embedding`` whose table stays in its stored dtype; the looked-up rows come out in float32 (a
    lookup commutes with the cast, so this equals the lookup in a float32 table)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).float()


UPCAST_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: UpcastLinear,
    nn.Conv2d: UpcastConv2d,
    nn.Embedding: UpcastEmbedding,
}


def upcast_per_layer(module: nn.Module) -> nn.Module:
    """Make ``module`` compute in float32 while its Linear, Conv2d and Embedding weights stored in float16
    or bfloat16 stay as they are (memory-mapped file views stay views): each such layer is replaced by its
    ``Upcast*`` counterpart holding the same parameters (same state-dict keys), which casts its weight to
    float32 inside its forward. Every other floating-point parameter and buffer (norms, biases of other
    layers) becomes float32, and so do whole ``FLOAT32_PARTS`` (tiny embedding MLPs that pick their input's
    dtype by their weights'). The result equals the float32 forward of the same rounded weights exactly."""
    kept = {id(m) for name, part in module.named_children() if name in FLOAT32_PARTS for m in part.modules()}
    for parent in list(module.modules()):
        if id(parent) in kept:
            continue
        for name, child in list(parent.named_children()):
            upcast = UPCAST_LAYERS.get(type(child)) or _prepacking_counterpart(child)
            if upcast is not None and child.weight.dtype in STORAGE_DTYPES:
                setattr(parent, name, _with_parameters_of(child, upcast))
    for sub in module.modules():
        if not isinstance(sub, UpcastLinear | UpcastConv2d | UpcastEmbedding):
            _float32_own_tensors(sub)
    return module


def _prepacking_counterpart(child: nn.Module) -> type[nn.Module] | None:
    """The upcast class for ``models.layers`` Linear / Conv2d (subclasses with oneDNN packing)."""
    from latentdiffusion.models import layers

    if isinstance(child, layers.Linear):
        return UpcastLinear
    if isinstance(child, layers.Conv2d):
        return UpcastConv2d
    return None


def _with_parameters_of(layer: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """An instance of ``cls`` holding ``layer``'s state as it is: its very parameters (no copy), settings
    and hooks; a oneDNN-packed copy of its weight is left behind."""
    new = cls.__new__(cls)
    new.__dict__.update(vars(layer))
    new.__dict__.pop("_packed_weight", None)
    return new


def _float32_own_tensors(module: nn.Module) -> None:
    for name, parameter in list(module.named_parameters(recurse=False)):
        if parameter.is_floating_point() and parameter.dtype != torch.float32:
            setattr(module, name, nn.Parameter(parameter.detach().float(), parameter.requires_grad))
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer.is_floating_point() and buffer.dtype != torch.float32:
            setattr(module, name, buffer.float())


def page_out_after_use(module: nn.Module) -> nn.Module:
    """Hand each layer's memory-mapped file pages back to the kernel right after the layer has run, so that
    ``module`` streams through memory one layer at a time and holds none of its file-backed weights between
    calls (see ``FilePages``: clean pages are read again from the file when touched; safe anywhere). Nothing
    is registered where no weight is file-backed (or off Linux), and only once per module."""
    if getattr(module, "_pages_out_after_use", False) or not FilePages(module).ranges:
        return module
    for layer in module.modules():
        if any(True for _ in layer.parameters(recurse=False)):
            layer.register_forward_hook(_page_out_own_parameters)
    module._pages_out_after_use = True
    return module


def page_out_packed_weights(module: nn.Module) -> nn.Module:
    """Hand back the file pages of the float32 weights of ``module``'s packed layers (see ``FilePages``)
    after each layer runs, and all of them again after ``module`` and each of its direct children run
    (a neighbour's page fault can map pages back around it): the packed path reads only the oneDNN copy,
    so the process holds one copy of each weight instead of two (SD 1.5's U-Net: 3.4 GB less). A weight
    is read again, from the page cache or the file, only when a new input shape needs a new packed copy.
    Layers whose weights are not views of a memory-mapped file (a model built in memory, a bf16
    conversion) get no hook; registered once."""
    from latentdiffusion.models.layers import Conv2d, Linear

    files, mapped = _file_mappings(), []
    for layer in module.modules():
        if not isinstance(layer, Conv2d | Linear) or getattr(layer, "_pages_out_when_packed", False):
            continue
        weight = layer.weight
        address, size = weight.data_ptr(), weight.numel() * weight.element_size()
        if weight.device.type == "cpu" and any(lo <= address and address + size <= hi for lo, hi in files):
            layer.register_forward_hook(partial(_page_out_if_packed, [(layer, address, size)]))
            layer._pages_out_when_packed = True
            mapped.append((layer, address, size))
    for part in (module, *module.children()):
        inside = {id(m) for m in part.modules()}
        ranges = [entry for entry in mapped if id(entry[0]) in inside]
        if ranges:
            part.register_forward_hook(partial(_page_out_if_packed, ranges))
    return module


def _page_out_if_packed(weights: list[tuple[nn.Module, int, int]], *hook_args: object) -> None:
    """Forward hook: hand back the pages of each (layer, weight address, size) whose layer runs packed on
    that very weight."""
    _page_out(
        [
            (address, size)
            for layer, address, size in weights
            if layer.prepack and layer._packed_weight is not None and layer.weight.data_ptr() == address
        ]
    )


def _page_out_own_parameters(layer: nn.Module, inputs: object, output: object) -> None:
    """Forward hook: madvise(PAGEOUT) the byte ranges of ``layer``'s own file-backed parameters."""
    files = _file_mappings()
    ranges = []
    for parameter in layer.parameters(recurse=False):
        address, size = parameter.data_ptr(), parameter.numel() * parameter.element_size()
        if parameter.device.type == "cpu" and any(lo <= address and address + size <= hi for lo, hi in files):
            ranges.append((address, size))
    _page_out(ranges)


def _page_out(ranges: list[tuple[int, int]]) -> None:
    if not ranges:
        return
    libc, page = ctypes.CDLL(None, use_errno=True), os.sysconf("SC_PAGE_SIZE")
    for address, size in ranges:
        start = address - address % page
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + size - start), MADV_PAGEOUT)


def _own_float32_copy(module: torch.nn.Module) -> None:
    state = module.state_dict()
    copies = {
        k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()
    }
    module.load_state_dict(copies, assign=True)


def precision_of(components: Components) -> str:
    """The precision ``components`` run in, by their U-Net's weights and packing ("fp32", "fp32-fast",
    "bf16", or a dtype name)."""
    if components.dtype == torch.float32:
        return "fp32-fast" if is_prepacked(components.network) else "fp32"
    names = {dtype: name for name, dtype in DTYPES.items()}
    return names.get(components.dtype, str(components.dtype).removeprefix("torch."))


def compile_unet(components: Components) -> None:
    """Compile the U-Net with ``torch.compile`` (TorchInductor) in place: same module, same state dict; the
    compilation itself happens on the first call (see ``warm_up``).

    Inductor's "freezing" treats the weights as constants and packs them for oneDNN itself (so our own
    packing is switched off) and fuses the elementwise work around them; weights changed after the
    first call (e.g. a LoRA merged later) are not seen by the compiled code.
    """
    set_prepacking(components.unet, False)
    components.unet.compile(options={"freezing": True})


@torch.inference_mode()
def warm_up(components: Components, width: int, height: int, batch: int = 2) -> float:
    """One U-Net call at the given image size (batch 2: a guided step); returns its seconds, which for a
    compiled U-Net is the compile time."""
    f = components.family.latent_format(components.config).factor
    unet = components.unet.config
    options = {"device": components.device, "dtype": components.dtype}
    x = torch.zeros(batch, unet.in_channels, height // f, width // f, **options)
    context = torch.zeros(batch, WARM_UP_TOKENS, unet.context_dim, **options)
    t = torch.full((batch,), 500.0, device=components.device)
    labels = torch.zeros(batch, dtype=torch.long, device=components.device) if unet.num_class_embeds else None
    y = torch.zeros(batch, unet.adm_in_channels, **options) if unet.adm_in_channels else None
    start = time.perf_counter()
    components.unet(x, t, context, labels, y=y)
    return time.perf_counter() - start
