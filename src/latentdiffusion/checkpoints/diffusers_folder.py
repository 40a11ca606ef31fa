"""diffusers-layout model folders: ``model_index.json`` plus ``unet/`` (or SD3's ``transformer/``),
``vae/``, ``text_encoder/``, ``tokenizer/`` (and ``_2``, ``_3`` for more encoders) and ``scheduler/``.

Each network folder holds a ``config.json`` and its weights (``diffusion_pytorch_model.safetensors``,
``model.safetensors`` for transformers; ``.fp16`` variants, sharded ``.index.json`` sets and
weights-only ``.bin`` pickles are read too, safetensors first). The scheduler config sets the model's
training schedule, prediction type, timestep spacing and default sampler and discretisation.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from latentdiffusion.checkpoints import autoencoder_keys, mmdit_keys, t5_keys, text_encoder_keys, unet_keys
from latentdiffusion.checkpoints.assemble import (
    assemble_components,
    check_shapes_first,
    require_stable_diffusion_architecture,
)
from latentdiffusion.checkpoints.bounds import validate_model_config
from latentdiffusion.checkpoints.diffusers_configs import (
    autoencoder_from_diffusers,
    autoencoder_to_diffusers,
    schedule_from_diffusers,
    schedule_to_diffusers,
    text_encoder_from_hf,
    text_encoder_to_hf,
    unet_from_diffusers,
    unet_to_diffusers,
)
from latentdiffusion.checkpoints.safe_io import (
    MAX_JSON_BYTES,
    file_kind,
    load_pickle,
    meta_tensors,
    read_json_file,
    read_safetensors_header,
    read_state_dict,
    require_regular_file,
    save_safetensors,
)
from latentdiffusion.components import Components
from latentdiffusion.config import ModelConfig
from latentdiffusion.errors import UserError
from latentdiffusion.families import FAMILIES, Family, family_of
from latentdiffusion.families.base import bundled_tokenizer
from latentdiffusion.files import atomic_write
from latentdiffusion.models.tokenizer import CLIPTokenizer

MODEL_INDEX = "model_index.json"
TOKENIZER_FOLDERS = {
    "text_encoder": "tokenizer",
    "text_encoder_2": "tokenizer_2",
    "text_encoder_3": "tokenizer_3",
}
T5_ROLE = "text_encoder_3"  # SD3's T5 encoder: the one text encoder that is not a CLIP
# safest and fullest first: safetensors before pickles, full precision before fp16 variants
DIFFUSERS_WEIGHTS = tuple(
    f"diffusion_pytorch_model{variant}.{ext}" for ext in ("safetensors", "bin") for variant in ("", ".fp16")
)
TRANSFORMERS_WEIGHTS = tuple(
    f"{stem}{variant}.{ext}"
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin"))
    for variant in ("", ".fp16")
)
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")
# the errors a converter raises on a config.json whose values have the wrong type or size
CONFIG_ERRORS = (
    KeyError,
    TypeError,
    ValueError,
    IndexError,
    ZeroDivisionError,
    OverflowError,
    AttributeError,
)
# config.json sizes (or lists of them) and their least values
SIZE_KEYS = {
    "block_out_channels": 1,
    "layers_per_block": 1,
    "attention_head_dim": 1,
    "num_attention_heads": 1,
    "cross_attention_dim": 1,
    "transformer_layers_per_block": 0,
    "norm_num_groups": 1,
}
UPSCALER_LOW_RES_SCHEDULE = {
    "_class_name": "DDPMScheduler",
    "beta_schedule": "linear",
    "num_train_timesteps": 1000,
}


def is_diffusers_folder(path: Path) -> bool:
    return (path / MODEL_INDEX).is_file()


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object of the folder, read only from a regular file of bounded size (see ``safe_io``)."""
    if not path.exists() and not path.is_symlink():
        raise UserError(f"{path} is missing; is {path.parent.parent} a complete diffusers model folder?")
    data = read_json_file(path)
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object")
    return data


def read_weights(folder: Path, names: tuple[str, ...], meta: bool = False) -> dict[str, torch.Tensor]:
    """The first weight file (or sharded set) of ``names`` present in ``folder``; with ``meta``, only
    the names, shapes and dtypes (safetensors: tensors on the meta device from the header alone)."""
    for name in names:
        if (folder / name).is_file():
            return _read_weight_file(folder / name, meta)
        index = folder / f"{name}.index.json"
        if index.is_file():
            state: dict[str, torch.Tensor] = {}
            for shard in shard_files(index):
                state.update(_read_weight_file(shard, meta))
            return state
    raise UserError(f"{folder} has no weights (expected {names[0]})")


def _read_weight_file(path: Path, meta: bool) -> dict[str, torch.Tensor]:
    if not meta:
        return read_state_dict(path)
    if file_kind(path) == "safetensors":
        return meta_tensors(read_safetensors_header(path))
    return load_pickle(path)  # memory-mapped where it can be; nothing cast or checked yet


def shard_files(index: Path) -> list[Path]:
    """The weight files a sharded set's ``.index.json`` names, each a plain file name inside the index's
    folder (no absolute path, no ``..``, no subfolder) that is a regular file (a symlink to one, as in
    the Hugging Face cache, is followed)."""
    weight_map = read_json(index).get("weight_map", {})
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index}: weight_map is not a map of tensor names to file names")
    shards = []
    for name in sorted(set(weight_map.values())):
        if not name or Path(name).name != name or name in (".", "..") or "\\" in name:
            raise UserError(f"{index} names a weight file outside its folder: {name!r}")
        shard = index.parent / name
        require_regular_file(shard)
        shards.append(shard)
    return shards


def read_tokenizer(folder: Path) -> CLIPTokenizer:
    """A ``tokenizer/`` folder: ``vocab.json`` + ``merges.txt``, or the ``tokenizer.json`` that
    transformers >= 5 writes instead (its BPE model holds the same vocabulary and merges)."""
    for name in TOKENIZER_FILES:  # regular files of bounded size only, before any parser opens them
        if (folder / name).exists() or (folder / name).is_symlink():
            require_regular_file(folder / name, "tokenizer file")
            if (folder / name).stat().st_size > MAX_JSON_BYTES:
                raise UserError(f"{folder / name} is too large for a tokenizer file")
    try:
        if (folder / "vocab.json").is_file() or not (folder / "tokenizer.json").is_file():
            return CLIPTokenizer.from_folder(folder)
        model = read_json(folder / "tokenizer.json")["model"]
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
        settings = (
            read_json(folder / "tokenizer_config.json")
            if (folder / "tokenizer_config.json").is_file()
            else {}
        )
        pad = settings.get("pad_token", "<|endoftext|>")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        length = settings.get("model_max_length")
        length = length if isinstance(length, int) and 2 <= length <= 1_000_000 else 77
        vocab = model["vocab"]
        return CLIPTokenizer(
            vocab, merges, pad_token_id=vocab.get(pad, vocab.get("<|endoftext|>", 0)), max_length=length
        )
    except RecursionError:
        raise UserError(
            f"cannot read the CLIP tokenizer in {folder}: its JSON is nested too deeply"
        ) from None
    except (OSError, KeyError, TypeError, ValueError, AttributeError) as error:
        raise UserError(f"cannot read the CLIP tokenizer in {folder}: {error}") from None


def model_config(
    path: Path, index: dict[str, Any], family: Family, tokenizers: dict[str, Any]
) -> ModelConfig:
    """Our ModelConfig from the folder's ``model_index.json`` (``index``) and component configs; defaults
    from the family's base preset."""
    network_role = family.network_role
    network_json = read_json(path / network_role / "config.json")
    vae_json = read_json(path / "vae" / "config.json")
    scheduler = path / "scheduler" / "scheduler_config.json"
    schedule_json = read_json(scheduler) if scheduler.exists() or scheduler.is_symlink() else {}
    _check_sizes(network_json, path / network_role / "config.json")
    _check_sizes(vae_json, path / "vae" / "config.json")
    texts: dict[str, Any] = {}
    try:
        network = read_network_config(network_role, network_json, str(path / network_role / "config.json"))
        vae = autoencoder_from_diffusers(vae_json)
        for role, tokenizer in tokenizers.items():
            text_json = read_json(path / role / "config.json")
            if role == T5_ROLE:
                texts[role] = t5_keys.t5_config_from_hf(text_json)
                continue
            text = text_encoder_from_hf(text_json, tokenizer.pad_token_id)
            texts[role] = replace(
                text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
            )
        schedule, sampler, sigmas = schedule_from_diffusers(schedule_json)
    except CONFIG_ERRORS as error:
        raise UserError(f"{path}: unsupported diffusers model: {error}") from None
    base = family.diffusers_base(network)
    texts = {role: family.adapt_text_config(text) for role, text in texts.items()}
    if T5_ROLE in texts:
        texts[T5_ROLE] = replace(texts[T5_ROLE], max_length=base.text_encoder_3.max_length)
    latent_size = network_json.get("sample_size") or 64
    latent_size = latent_size[0] if isinstance(latent_size, list) and latent_size else latent_size
    if isinstance(latent_size, bool) or not isinstance(latent_size, int) or not 1 <= latent_size <= 2048:
        raise UserError(
            f"{path / network_role / 'config.json'}: sample_size {latent_size!r} is not an integer 1-2048"
        )
    vae = replace(vae, scaling_factor=vae_json.get("scaling_factor", base.autoencoder.scaling_factor))
    networks = {"unet": network} if network_role == "unet" else {"transformer": network}
    config = replace(
        base,
        name=path.name,
        autoencoder=vae,
        **networks,
        text_encoder=texts.get("text_encoder"),
        text_encoder_2=texts.get("text_encoder_2"),
        text_encoder_3=texts.get(T5_ROLE),
        schedule=schedule,
        sample_size=int(latent_size) * vae.downsampling_factor,
        default_sampler=sampler or base.default_sampler,
        default_sigmas=sigmas if sampler else base.default_sigmas,
        zero_empty_negative=index.get("force_zeros_for_empty_prompt") is True,
    )
    return validate_model_config(config, str(path))


def read_network_config(role: str, data: dict[str, Any], source: str) -> Any:
    """The denoising network's config from its ``config.json``: a U-Net's, or SD3's transformer's."""
    if role == "transformer":
        return mmdit_keys.mmdit_config_from_diffusers(data, source)
    return unet_from_diffusers(data)


def _check_sizes(config: dict[str, Any], source: Path) -> None:
    """The sizes a converter divides by or counts with, before it does (``bounds`` checks the rest)."""
    for key in SIZE_KEYS:
        value = config.get(key)
        values = value if isinstance(value, list) else [value]
        if value is None or not values:
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= SIZE_KEYS[key] for v in values):
            raise UserError(
                f"{source}: invalid model config: {key} = {value!r}; expected integers >= {SIZE_KEYS[key]}"
            )


def folder_family(path: Path, index: dict[str, Any]) -> Family:
    """The family that reads the folder's ``model_index.json`` (``index``)."""
    for family in FAMILIES.values():
        try:
            reads = family.reads_diffusers(index)
        except (TypeError, IndexError, KeyError, AttributeError):  # a value of the wrong type
            reads = False
        if reads:
            return family
    raise UserError(f"{path} holds a {index.get('_class_name')}, which no model family of this version runs")


def read_tokenizers(
    path: Path, family: Family, fallback: ModelConfig, index: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Each text encoder's tokenizer folder (``tokenizer``, ``tokenizer_2``, ...), else the bundled one;
    an encoder the index marks absent (``[null, null]``, SD3 without T5) has none."""
    from latentdiffusion.models.t5 import T5Tokenizer

    tokenizers: dict[str, Any] = {}
    for role in family.text_roles:
        if index is not None and _absent(index, role):
            continue
        folder = path / TOKENIZER_FOLDERS[role]
        if role == T5_ROLE:
            tokenizers[role] = (
                T5Tokenizer.from_folder(folder) if folder.is_dir() else T5Tokenizer.from_bundled()
            )
            continue
        text = getattr(fallback, role) or fallback.text_encoder_2
        tokenizers[role] = read_tokenizer(folder) if folder.is_dir() else bundled_tokenizer(text)
    return tokenizers


def _absent(index: dict[str, Any], role: str) -> bool:
    entry = index.get(role)
    return isinstance(entry, list) and len(entry) == 2 and entry[1] is None


def read_role(path: Path, role: str, config: ModelConfig, meta: bool = False) -> dict[str, torch.Tensor]:
    """One network's weights in our names (with ``meta``: only their shapes, see ``read_weights``)."""
    if role == "unet":
        return unet_keys.from_diffusers_state_dict(read_weights(path / "unet", DIFFUSERS_WEIGHTS, meta))
    if role == "transformer":
        return mmdit_keys.mmdit_from_diffusers(read_weights(path / role, DIFFUSERS_WEIGHTS, meta))
    if role == T5_ROLE:
        return t5_keys.from_hf_state_dict(read_weights(path / role, TRANSFORMERS_WEIGHTS, meta))
    if role == "autoencoder":
        return autoencoder_keys.from_diffusers_state_dict(read_weights(path / "vae", DIFFUSERS_WEIGHTS, meta))
    text = getattr(config, role)
    return text_encoder_keys.from_hf_state_dict(
        read_weights(path / role, TRANSFORMERS_WEIGHTS, meta),
        num_layers=text.num_layers - text.skip_last_layers,
        projection=text.projection_dim is not None,
    )


def load_diffusers(
    path: str | Path, *, dtype: torch.dtype | None = None, without: Collection[str] = ()
) -> Components:
    """A diffusers folder of any family's pipeline class as Components, without the optional networks
    ``without`` (their folders are not read)."""
    path = Path(path)
    index = read_json(path / MODEL_INDEX)
    family = folder_family(path, index)
    tokenizers = read_tokenizers(path, family, family.diffusers_base(None), index)
    config = family.without_roles(model_config(path, index, family, tokenizers), without, str(path))
    tokenizers = {role: tokenizer for role, tokenizer in tokenizers.items() if role not in without}
    # names and shapes decide before any weight is read (checked for NaN and infinity) or cast
    shapes = {role: read_role(path, role, config, meta=True) for role in family.model_roles(config)}
    modules = check_shapes_first(config, shapes, str(path))
    del shapes
    states = {role: read_role(path, role, config) for role in family.model_roles(config)}
    return assemble_components(
        config, states, name=path.name, source=str(path), dtype=dtype, tokenizers=tokenizers, modules=modules
    )


def model_index(config: ModelConfig, scheduler_class: str) -> dict[str, Any]:
    family = family_of(config)
    network = (
        ["diffusers", "UNet2DConditionModel"]
        if family.network_role == "unet"
        else ["diffusers", mmdit_keys.DIFFUSERS_CLASS]
    )
    index: dict[str, Any] = {
        "scheduler": ["diffusers", scheduler_class],
        family.network_role: network,
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for role, text in family.text_configs(config).items():
        kind = "CLIPTextModel" if text.projection_dim is None else "CLIPTextModelWithProjection"
        index[role] = ["transformers", kind]
        index[TOKENIZER_FOLDERS[role]] = ["transformers", "CLIPTokenizer"]
    if T5_ROLE in family.text_roles:
        t5 = config.text_encoder_3 is not None
        index[T5_ROLE] = ["transformers", "T5EncoderModel"] if t5 else [None, None]
        index[TOKENIZER_FOLDERS[T5_ROLE]] = ["transformers", "T5TokenizerFast"] if t5 else [None, None]
    index.update(family.diffusers_index(config))
    return dict(sorted(index.items(), key=lambda item: item[0] != "_class_name"))


def write_json(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _weights(module: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}


def save_diffusers(components: Components, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write a folder that diffusers' ``from_pretrained`` and ``load_diffusers`` read back exactly.

    ``model_index.json`` is written last, so an interrupted save never looks like a model.
    """
    path, config = Path(path), components.config
    require_stable_diffusion_architecture(config, components.name, "diffusers")
    latent_size = config.sample_size // config.autoencoder.downsampling_factor
    family = family_of(config)
    role = family.network_role
    network = _weights(components.modules[role], dtype)
    if role == "unet":
        network, network_json = (
            unet_keys.to_diffusers_state_dict(network),
            unet_to_diffusers(config.unet, latent_size),
        )
    else:
        network = mmdit_keys.mmdit_to_diffusers(network)
        network_json = mmdit_keys.mmdit_config_to_diffusers(
            replace(config.transformer, sample_size=latent_size)
        )
    save_safetensors(network, path / role / DIFFUSERS_WEIGHTS[0])
    write_json(path / role / "config.json", network_json)
    vae = autoencoder_keys.to_diffusers_state_dict(_weights(components.autoencoder, dtype))
    save_safetensors(vae, path / "vae" / DIFFUSERS_WEIGHTS[0])
    vae_json = autoencoder_to_diffusers(config.autoencoder, config.sample_size)
    write_json(path / "vae" / "config.json", vae_json)
    for role, text_config in family.text_configs(config).items():
        text = text_encoder_keys.to_hf_state_dict(_weights(components.modules[role], dtype))
        save_safetensors(text, path / role / TRANSFORMERS_WEIGHTS[0])
        write_json(path / role / "config.json", text_encoder_to_hf(text_config))
        components.tokenizers[role].save(path / TOKENIZER_FOLDERS[role])
    if config.text_encoder_3 is not None:
        t5 = t5_keys.to_hf_state_dict(_weights(components.modules[T5_ROLE], dtype))
        save_safetensors(t5, path / T5_ROLE / TRANSFORMERS_WEIGHTS[0])
        write_json(path / T5_ROLE / "config.json", t5_keys.t5_config_to_hf(config.text_encoder_3))
        components.tokenizers[T5_ROLE].save(path / TOKENIZER_FOLDERS[T5_ROLE])
    schedule = schedule_to_diffusers(config.schedule, config.default_sampler, config.default_sigmas)
    write_json(path / "scheduler" / "scheduler_config.json", schedule)
    if config.unet.num_class_embeds is not None:
        write_json(path / "low_res_scheduler" / "scheduler_config.json", UPSCALER_LOW_RES_SCHEDULE)
    write_json(path / MODEL_INDEX, model_index(config, schedule["_class_name"]))
