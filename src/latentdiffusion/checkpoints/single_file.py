"""The original single-file layout (``v1-5-pruned-emaonly.safetensors``, ``512-inpainting-ema.ckpt``, ...).

Loading: read the tensors safely (``safe_io``), decide the architecture from a CompVis ``.yaml`` of
the same stem beside the file when there is one, else from the keys and shapes (``detect``); rename
each network's tensors with its generated ``Layout`` and adopt them into networks built on the meta
device. The prediction type comes from, in order: the ``prediction_type`` argument, the yaml's
``parameterization``, a ``v_pred`` marker key (as ComfyUI writes), the variant (the x4 upscaler is v,
SD 1.x and inpainting models are eps) and, for SD 2.x text-to-image files, one probe forward pass.

Saving writes the same layout as safetensors plus the ``.yaml`` that describes it to CompVis-style
tools. The yaml format cannot say everything (text-encoder heads, norm groups, sampler defaults), so
the file's safetensors metadata also carries our exact ``ModelConfig`` as JSON; when present it takes
precedence over the yaml and over detection (other tools ignore it).
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from latentdiffusion.checkpoints.assemble import (
    assemble_components,
    check_shapes_first,
    read_dtype,
    require_stable_diffusion_architecture,
)
from latentdiffusion.checkpoints.bounds import validate_model_config
from latentdiffusion.checkpoints.compvis import CompVisSettings, compvis_yaml, read_compvis_yaml
from latentdiffusion.checkpoints.detect import (
    Shapes,
    check_stable_diffusion,
    detect_autoencoder,
    detect_text_encoder,
    detect_unet,
    probe_prediction_type,
)
from latentdiffusion.checkpoints.keymap import first_keys
from latentdiffusion.checkpoints.layout import Layout, ignored, read_layout, write_layout
from latentdiffusion.checkpoints.original_keys import (
    UNUSED_TOP_LEVEL,
    autoencoder_layout,
    default_text_kind,
    text_layout,
    unet_layout,
)
from latentdiffusion.checkpoints.safe_io import (
    check_finite,
    file_kind,
    load_pickle,
    load_safetensors,
    meta_tensors,
    parse_json,
    read_safetensors_header,
    read_state_dict,
    save_safetensors,
)
from latentdiffusion.components import Components
from latentdiffusion.config import PRESETS, ModelConfig, UNetConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families import FAMILIES, family_of
from latentdiffusion.files import atomic_write

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
YAML_SUFFIXES = (".yaml", ".yml")
V_PRED_MARKER, ZERO_SNR_MARKER = "v_pred", "ztsnr"  # empty marker tensors some tools write
VARIANT_PRESETS = {  # variant -> the preset whose defaults (size, steps, schedule) it takes
    "sd1": "sd15",
    "sd1-inpaint": "sd15-inpaint",
    "sd2": "sd21",
    "sd2-inpaint": "sd21",
    "x4-upscaler": "sd-x4-upscaler",
}
SD2_V_SAMPLE_SIZE = 768
# what detection's shape arithmetic raises on shapes no real model has (a 0-wide layer, a 1-D conv)
SHAPE_ERRORS = (IndexError, ValueError, ZeroDivisionError, KeyError, TypeError)
CONFIG_METADATA = "latentdiffusion.config"
FAMILY_LAYOUT = "family"  # the text kind of a plan whose layouts the family gives


@dataclass(frozen=True)
class SingleFilePlan:
    """The architecture of a single file and how to read it."""

    config: ModelConfig
    variant: str
    text_kind: str  # "hf" or "openclip"
    probe: bool  # decide eps/v by probe_prediction_type after loading
    dropped: tuple[str, ...] = ()  # key prefixes of stored networks left unread (an optional text encoder)


def find_yaml(path: Path) -> Path | None:
    """``model.yaml`` beside ``model.safetensors`` (the CompVis / web UI convention)."""
    for suffix in YAML_SUFFIXES:
        candidate = path.with_suffix(suffix)
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return None


def variant_of(unet: UNetConfig, text_kind: str) -> str:
    if unet.num_class_embeds is not None:
        return "x4-upscaler"
    family = "sd2" if text_kind == "openclip" else "sd1"
    return family + ("-inpaint" if unet.in_channels == 9 else "")


def plan_single_file(
    shapes: Shapes,
    settings: CompVisSettings | None,
    *,
    source: str,
    name: str,
    prediction_type: str | None = None,
) -> SingleFilePlan:
    """Decide the ModelConfig of a single file from a yaml (if any) and the tensor shapes: a family that
    recognises the keys as its own (SDXL base/refiner) decides, else the Stable Diffusion 1.x/2.x rules."""
    family_plan = plan_family_file(shapes, source=source, name=name, prediction_type=prediction_type)
    if family_plan is not None:
        return family_plan
    check_stable_diffusion(shapes, source)
    text = detect_text_encoder(shapes, source, settings.text_layer if settings else None)
    if settings is not None and settings.text_kind != text.kind:
        raise UserError(
            f"{source}: its .yaml describes a {settings.text_kind} text encoder, the file holds {text.kind}"
        )
    unet = settings.unet if settings else detect_unet(shapes, source)
    variant = variant_of(unet, text.kind)
    base = PRESETS[VARIANT_PRESETS[variant]]
    if settings is not None:
        autoencoder, schedule = settings.autoencoder, settings.schedule
        sample_size = settings.sample_size or base.sample_size
    else:
        autoencoder = replace(
            detect_autoencoder(shapes, source), scaling_factor=base.autoencoder.scaling_factor
        )
        schedule, sample_size = base.schedule, base.sample_size
    if ZERO_SNR_MARKER in shapes:
        schedule = replace(schedule, rescale_zero_terminal_snr=True)
    known = _stated_prediction_type(prediction_type, settings, shapes)
    if known is not None:
        schedule = replace(schedule, prediction_type=known)
    if text.kind == "openclip":  # the reference SD 2 code computes attention scores in float32
        unet = replace(unet, upcast_attention=True)
    config = replace(base, name=name, unet=unet, autoencoder=autoencoder, text_encoder=text.config)
    config = replace(config, schedule=schedule, sample_size=sample_size)
    if known == "v_prediction" and variant == "sd2" and settings is None:
        config = replace(config, sample_size=SD2_V_SAMPLE_SIZE)
    return SingleFilePlan(config, variant, text.kind, probe=known is None and variant == "sd2")


def plan_family_file(
    shapes: Shapes, *, source: str, name: str, prediction_type: str | None
) -> SingleFilePlan | None:
    """The plan of a file that a family other than SD 1.x/2.x recognises, else None."""
    for family in FAMILIES.values():
        config = family.single_file_config(shapes, source, name)
        if config is None:
            continue
        schedule = config.schedule
        if ZERO_SNR_MARKER in shapes:
            schedule = replace(schedule, rescale_zero_terminal_snr=True)
        known = _stated_prediction_type(prediction_type, None, shapes)
        if known is not None:
            schedule = replace(schedule, prediction_type=known)
        variant = family.name + ("-inpaint" if config.unet.in_channels > config.unet.out_channels else "")
        return SingleFilePlan(replace(config, schedule=schedule), variant, FAMILY_LAYOUT, probe=False)
    return None


def _stated_prediction_type(
    option: str | None, settings: CompVisSettings | None, shapes: Shapes
) -> str | None:
    """eps/v as the caller, the yaml or a ``v_pred`` marker states it; None if nothing does."""
    if option is not None:
        return option
    if settings is not None:
        return settings.schedule.prediction_type
    return "v_prediction" if V_PRED_MARKER in shapes else None


def single_file_layouts(config: ModelConfig, text_kind: str) -> dict[str, Layout]:
    """Each network's place in the file: the family's own layouts, or SD 1.x/2.x's by text kind."""
    if config.family != "sd":
        return family_of(config).single_file_layouts(config)
    return {
        "unet": unet_layout(config.unet),
        "autoencoder": autoencoder_layout(config.autoencoder),
        "text_encoder": text_layout(config.text_encoder, text_kind),
    }


def split_single_file(
    state: dict[str, torch.Tensor], plan: SingleFilePlan, source: str
) -> dict[str, dict[str, torch.Tensor]]:
    """Each network's state dict in our names; keys of no network and of no known extra are refused."""
    layouts = single_file_layouts(plan.config, plan.text_kind)
    prefixes = tuple(layout.prefix for layout in layouts.values()) + plan.dropped
    stray = [k for k in state if not k.startswith(prefixes) and not ignored(k, UNUSED_TOP_LEVEL)]
    if stray:
        what = f"a Stable Diffusion {plan.variant} model"
        raise UserError(f"{source} does not fit {what}: unexpected keys: {first_keys(stray)}")
    return {name: read_layout(state, layout) for name, layout in layouts.items()}


def without_roles(plan: SingleFilePlan, roles: Collection[str], source: str) -> SingleFilePlan:
    """The plan that leaves the optional networks ``roles`` unread (their keys are then not strays)."""
    if not roles:
        return plan
    layouts = single_file_layouts(plan.config, plan.text_kind)
    config = family_of(plan.config).without_roles(plan.config, roles, source)
    dropped = tuple(layouts[role].prefix for role in roles if role in layouts)
    return replace(plan, config=config, dropped=dropped)


def read_plan(
    path: Path, state: dict[str, torch.Tensor] | None = None, prediction_type: str | None = None
) -> SingleFilePlan:
    """The plan of a single file: its saved config, else its yaml, else detection from its shapes;
    whichever it is, the config is validated (``bounds``) before anything is built from it.

    Shapes come from ``state`` when given, else from the safetensors header alone (no tensor data
    is read) or, for pickles, from loading the file.
    """
    header = read_safetensors_header(path) if file_kind(path) == "safetensors" else None
    if state is None and header is not None:
        shapes = {k: entry.shape for k, entry in header.entries.items()}
    else:
        shapes = {
            k: tuple(v.shape) for k, v in (state if state is not None else read_state_dict(path)).items()
        }
    metadata = header.metadata if header is not None else {}
    try:
        plan = saved_plan(metadata, shapes, str(path), path.stem, prediction_type)
        if plan is None:
            yaml = find_yaml(path)
            settings = read_compvis_yaml(yaml) if yaml is not None else None
            plan = plan_single_file(
                shapes, settings, source=str(path), name=path.stem, prediction_type=prediction_type
            )
    except UserError:
        raise
    except SHAPE_ERRORS as error:
        raise UserError(
            f"{path}: unknown architecture: its tensor shapes fit no supported model ({error})"
        ) from None
    validate_model_config(plan.config, str(path))
    return plan


def load_single_file(
    path: str | Path,
    *,
    prediction_type: str | None = None,
    dtype: torch.dtype | None = None,
    without: Collection[str] = (),
) -> Components:
    """A single-file checkpoint (safetensors or a weights-only pickle) as Components.

    Cheap checks first: the architecture is decided and validated from the names and shapes alone (the
    safetensors header, or the tensors of a pickle before any is cast) and the networks built on meta
    are checked against them; only then are the weights read (checked for NaN and infinity) and cast.
    """
    path = Path(path)
    if file_kind(path) == "safetensors":
        header_state = meta_tensors(read_safetensors_header(path))
        plan = without_roles(read_plan(path, header_state, prediction_type), without, str(path))
        modules = check_shapes_first(plan.config, split_single_file(header_state, plan, str(path)), str(path))
        state = load_safetensors(path, read_dtype(dtype))
    else:
        state = load_pickle(path)  # memory-mapped, overlapping or oversized storages already refused
        plan = without_roles(read_plan(path, state, prediction_type), without, str(path))
        modules = check_shapes_first(plan.config, split_single_file(state, plan, str(path)), str(path))
        state = _checked_and_cast(state, read_dtype(dtype), path)
    states = split_single_file(state, plan, str(path))
    del state
    components = assemble_components(
        plan.config, states, name=path.stem, source=str(path), dtype=dtype, modules=modules
    )
    if plan.probe:
        components.config = with_probed_prediction(components.config, probe_prediction_type(components.unet))
    return components


def saved_plan(
    metadata: dict[str, str], shapes: Shapes, source: str, name: str, prediction_type: str | None
) -> SingleFilePlan | None:
    """The plan recorded by ``save_single_file`` in the safetensors metadata, if any."""
    if CONFIG_METADATA not in metadata:
        return None
    data = parse_json(metadata[CONFIG_METADATA], f"{source} ({CONFIG_METADATA} metadata)")
    try:
        config = ModelConfig.from_dict(data)
    except (TypeError, ValueError, AttributeError) as error:
        raise UserError(f"{source} has an invalid {CONFIG_METADATA} metadata entry: {error}") from None
    validate_model_config(config, f"{source} ({CONFIG_METADATA} metadata)")
    config = replace(config, name=name)
    if prediction_type is not None:
        config = replace(config, schedule=replace(config.schedule, prediction_type=prediction_type))
    if config.family != "sd":
        return SingleFilePlan(config, family_of(config).name, FAMILY_LAYOUT, probe=False)
    check_stable_diffusion(shapes, source)
    text_kind = default_text_kind(config.text_encoder)
    return SingleFilePlan(config, variant_of(config.unet, text_kind), text_kind, probe=False)


def _checked_and_cast(
    state: dict[str, torch.Tensor], dtype: torch.dtype | None, path: Path
) -> dict[str, torch.Tensor]:
    """A pickle's tensors, each checked for NaN and infinity, floating-point ones cast to ``dtype``."""
    for name, tensor in state.items():
        check_finite(tensor, name, path)
        if dtype is not None and tensor.is_floating_point():
            state[name] = tensor.to(dtype)
    return state


def with_probed_prediction(config: ModelConfig, prediction_type: str) -> ModelConfig:
    config = replace(config, schedule=replace(config.schedule, prediction_type=prediction_type))
    return replace(config, sample_size=SD2_V_SAMPLE_SIZE) if prediction_type == "v_prediction" else config


def single_file_state(components: Components, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of ``components`` under its single-file name (plus the prediction markers)."""
    config = components.config
    text_kind = default_text_kind(config.text_encoder) if config.family == "sd" else FAMILY_LAYOUT
    layouts = single_file_layouts(config, text_kind)
    state: dict[str, torch.Tensor] = {}
    for role, module in components.modules.items():
        ours = module.state_dict()
        ours = {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in ours.items()}
        state.update(write_layout(ours, layouts[role]))
    schedule = components.config.schedule
    marker = torch.zeros(0, dtype=dtype or torch.float32)
    if schedule.prediction_type == "v_prediction":
        state[V_PRED_MARKER] = marker
    if schedule.rescale_zero_terminal_snr:
        state[ZERO_SNR_MARKER] = marker
    return state


def save_single_file(components: Components, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write ``path`` (.safetensors) and, for SD 1.x/2.x, the CompVis ``.yaml`` beside it, each atomically
    (other families' files are recognised by their keys)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(
            f"a single-file model is written as .safetensors (pickles are unsafe to share), got {path}"
        )
    require_stable_diffusion_architecture(components.config, components.name, "single-file")
    metadata = {CONFIG_METADATA: json.dumps(components.config.to_dict())}
    save_safetensors(single_file_state(components, dtype), path, metadata)
    if components.config.family != "sd":
        return
    text = compvis_yaml(components.config, default_text_kind(components.config.text_encoder))
    atomic_write(path.with_suffix(".yaml"), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
