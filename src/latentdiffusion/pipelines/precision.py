"""Numerical precision and the CPU fast path: ``precision="fp32" | "bf16" | "auto"``.

"bf16" runs the U-Net and the autoencoder with bfloat16 weights and activations (Kalamkar et al.
2019, "A Study of BFLOAT16 for Deep Learning Training": float32's exponent range, 8 bits of
mantissa), convolutions on channels_last activations with weights pre-packed for oneDNN
(``models.layers.set_prepacking``), attention through SDPA's fused CPU kernel. What stays float32,
and why (measured on the SD 1.5 architecture, see docs/benchmarks.md):

- the timestep-embedding MLP: tiny, and its sinusoid input needs more than 8 mantissa bits;
- the sampler state, the guidance arithmetic and the x0 conversion (``Denoiser`` casts the network
  output back to the float32 latent), and the decoded image (cast to float32 before 8-bit rounding);
- the text encoder: it runs once per prompt, so bfloat16 would save nothing worth its error;
- GroupNorm / LayerNorm statistics and the attention softmax: PyTorch's CPU kernels already
  accumulate bfloat16 inputs in float32, so nothing needs upcasting by hand.

"auto" picks bf16 on a CPU with native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16) and fp32
otherwise; "fp32" is the plain reference path (float32 weights, no packing).
"""

from __future__ import annotations

import ctypes
import os
import time
from functools import cache
from pathlib import Path

import torch

from latentdiffusion.components import Components
from latentdiffusion.errors import UserError
from latentdiffusion.models.layers import set_prepacking

PRECISIONS = ("fp32", "bf16", "auto")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bfloat16 arithmetic
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MADV_PAGEOUT = 21  # linux/mman.h
# the denoising networks' embedding MLPs, which a bf16 model keeps in float32 (U-Net; SD3's MMDiT)
FLOAT32_PARTS = ("time_embedding", "add_embedding", "time_embed", "pooled_embed")
BF16_TEXT_ROLES = ("text_encoder_3",)  # T5-XXL (4.7 B) trained in bfloat16: float32 would take 19 GB
WARM_UP_TOKENS = 77  # one CLIP chunk of context


@cache
def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16), not by emulation."""
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
    """ "fp32" or "bf16" for ``precision`` on ``device`` (default CPU): "auto" is bf16 on a CPU with
    native bfloat16, fp32 anywhere else."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    on_cpu = torch.device(device or "cpu").type == "cpu"
    return "bf16" if on_cpu and cpu_has_bf16() else "fp32"


def apply_precision(components: Components, precision: str) -> Components:
    """Convert ``components`` in place to a resolved precision ("fp32" or "bf16"); returns them.

    bf16 converts the denoising network (U-Net or MMDiT) and the autoencoder, and SD3's T5 (trained in
    bfloat16; 19 GB in float32); the CLIP text encoders and the network's small embedding MLPs
    (``FLOAT32_PARTS``) stay float32: they run once per image or step, and a sinusoid of a large timestep
    loses its phase in bfloat16."""
    if precision not in DTYPES:
        raise UserError(f"precision must be fp32 or bf16 here (resolve 'auto' first), got {precision!r}")
    modules = components.modules.values()
    # The file pages each conversion has read are handed back to the kernel as it goes (``FilePages``),
    # so they never add up to the whole file beside the converted copy in this process.
    pages = FilePages(*modules)
    if precision == "fp32":
        for module in modules:
            for child in module.children():
                child.float()  # a float32 file's weights stay views of the file: no copy
                pages.release()
            module.float()
            set_prepacking(module, False)
        return components
    # Every part gets memory of its own (the float32 parts a copy), so that nothing views a memory-mapped
    # weight file any more and its mapping is released.
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
    for module in (network, components.autoencoder):
        set_prepacking(module, components.device.type == "cpu")
    return components


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


def _own_float32_copy(module: torch.nn.Module) -> None:
    state = module.state_dict()
    copies = {
        k: v.to(torch.float32 if v.is_floating_point() else v.dtype, copy=True) for k, v in state.items()
    }
    module.load_state_dict(copies, assign=True)


def precision_of(components: Components) -> str:
    """The precision ``components`` run in, by their U-Net's weights ("fp32", "bf16", or a dtype name)."""
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
