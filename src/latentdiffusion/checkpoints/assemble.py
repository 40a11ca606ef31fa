"""Networks built on the meta device and filled with loaded tensors: one copy of the weights, no random init.

``torch.device("meta")`` builds the modules without allocating or initialising parameters;
``load_state_dict(assign=True)`` then adopts the loaded tensors themselves (memory-mapped views where
the dtype already matches), so a model is never held twice and no time is spent on random weights.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from latentdiffusion.checkpoints.bounds import validate_model_config
from latentdiffusion.checkpoints.keymap import first_keys
from latentdiffusion.components import Components
from latentdiffusion.config import ModelConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families import family_of
from latentdiffusion.models.tokenizer import CLIPTokenizer


def require_stable_diffusion_architecture(config: ModelConfig, name: str, layout: str) -> None:
    """Refuse to write a model into a Stable Diffusion layout (``layout``: "diffusers", "single-file")
    that cannot describe it, instead of writing a file other tools would misread."""
    parts = config.beyond_stable_diffusion()
    if parts:
        raise UserError(
            f"model {name!r} cannot be saved in the {layout} layout: {'; '.join(parts)}, which that layout "
            "cannot describe; save it in the native format"
        )


# ``dtype`` of the loaders that keeps every tensor in the file's own dtype (memory-mapped, no copy), for a
# caller that converts the networks itself right after loading (``precision``).
FILE_DTYPE = "file"


def read_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype to read a weight file in: the given one, float32 by default, or the file's own."""
    return None if dtype == FILE_DTYPE else dtype or torch.float32


def check_fits(module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise one UserError naming missing, unexpected and wrongly shaped keys (first few of each)."""
    expected = module.state_dict()
    missing = expected.keys() - state.keys()
    unexpected = state.keys() - expected.keys()
    wrong = [
        f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in sorted(expected.keys() & state.keys())
        if state[k].shape != expected[k].shape
    ]
    # a float weight stored as integers would be adopted as an integer parameter
    integer = [
        f"{k} ({state[k].dtype})"
        for k in sorted(expected.keys() & state.keys())
        if expected[k].is_floating_point() and not state[k].is_floating_point()
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {first_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {first_keys(unexpected)}")
    if wrong:
        problems.append(
            f"wrongly shaped: {', '.join(wrong[:5])}"
            + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "")
        )
    if integer:
        problems.append(f"stored as integers, not floating point: {', '.join(integer[:5])}")
    if problems:
        raise UserError(f"{source} does not fit the model: " + "; ".join(problems))


def assign_weights(
    module: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str, dtype: torch.dtype | None = None
) -> None:
    """Strictly load ``state`` into ``module`` (built on meta or not), adopting the tensors themselves.

    Floating-point tensors are cast to ``dtype`` (default: the module's own dtype); a tensor that
    already has it is used as is, without a copy.
    """
    check_fits(module, state, source)
    if dtype == FILE_DTYPE:
        module.load_state_dict(dict(state), strict=True, assign=True)
        return
    expected = module.state_dict()
    cast = {k: v.to(dtype or expected[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    module.load_state_dict(cast, strict=True, assign=True)


def build_on_meta(config: ModelConfig) -> dict[str, torch.nn.Module]:
    with torch.device("meta"):
        return family_of(config).build(config)


def check_shapes_first(
    config: ModelConfig, states: Mapping[str, Mapping[str, torch.Tensor]], source: str
) -> dict[str, torch.nn.Module]:
    """Validate ``config``, build its networks on meta and check that ``states`` (tensors on the meta
    device made from a file's header alone, or tensors not yet read) fit them, before any weight is read
    or cast; returns the networks for ``assemble_components``."""
    validate_model_config(config, source)
    modules = build_on_meta(config)
    for role, module in modules.items():
        check_fits(module, states[role], f"{source} [{role}]")
    return modules


def assemble_components(
    config: ModelConfig,
    states: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    name: str,
    source: str,
    dtype: torch.dtype | None = None,
    tokenizers: Mapping[str, CLIPTokenizer] | None = None,
    modules: Mapping[str, torch.nn.Module] | None = None,
) -> Components:
    """Components whose networks hold exactly ``states[role]`` for each of the family's roles; the
    tokenizers default to the bundled CLIP vocabulary with each text encoder's settings. ``modules``:
    the networks ``check_shapes_first`` built on meta (else they are built here)."""
    if modules is None:
        validate_model_config(config, source)
        modules = build_on_meta(config)
    modules = dict(modules)
    for role, module in modules.items():
        assign_weights(module, states[role], f"{source} [{role}]", dtype)
        _check_materialised(module, f"{source} [{role}]")
    tokenizers = dict(tokenizers) if tokenizers is not None else family_of(config).tokenizers(config)
    return Components(config, modules, tokenizers, name).eval()


def _check_materialised(module: torch.nn.Module, source: str) -> None:
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise UserError(f"{source}: no weights for {first_keys(left)}")
