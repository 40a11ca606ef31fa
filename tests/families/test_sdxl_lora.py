"""SDXL LoRA files (kohya's lora_unet_/lora_te1_/lora_te2_ names, and diffusers/PEFT files) merge into
the same weights as diffusers' own loader does; a LoRA for the other family is refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints import autoencoder_keys, text_encoder_keys, unet_keys
from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline

pytest.importorskip("diffusers")
pytest.importorskip("peft")

# kohya names (sgm U-Net names) -> (our role, our module path) in the tiny SDXL of sdxl_fixtures
KOHYA = {
    "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q": (
        "unet",
        "down_blocks.1.attentions.0.blocks.0.attn1.to_q",
    ),
    "lora_unet_input_blocks_3_1_proj_in": ("unet", "down_blocks.1.attentions.0.proj_in"),
    "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k": (
        "unet",
        "mid_block.attention.blocks.1.attn2.to_k",
    ),
    "lora_unet_output_blocks_0_1_transformer_blocks_1_ff_net_0_proj": (
        "unet",
        "up_blocks.0.attentions.0.blocks.1.ff.proj_in",
    ),
    "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1"),
    "lora_te1_text_model_encoder_layers_1_mlp_fc2": ("text_encoder", "layers.1.mlp.fc2"),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": ("text_encoder_2", "layers.0.mlp.fc1"),
}
# Text-encoder attention layers: diffusers 0.42 with transformers 5 renames them to keys the text encoder
# does not have (to_q_lora), so they are checked against the update computed by hand.
KOHYA_ATTENTION = {
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder", "layers.0.self_attn.q_proj"),
    "lora_te2_text_model_encoder_layers_2_self_attn_out_proj": (
        "text_encoder_2",
        "layers.2.self_attn.out_proj",
    ),
}


def kohya_file(components, path, rank: int = 2, names=KOHYA) -> dict:
    """Entries without alpha (alpha = rank): diffusers 0.42 with peft drops some alphas of kohya files
    (its alpha_pattern does not match their module names), so alphas are checked in tests/training."""
    generator = torch.Generator().manual_seed(11)
    entries = {}
    for name, (role, module_path) in names.items():
        weight = components.modules[role].get_submodule(module_path).weight
        kernel = weight.shape[2:]
        entries[f"{name}.lora_down.weight"] = torch.randn(rank, weight.shape[1], *kernel, generator=generator)
        entries[f"{name}.lora_up.weight"] = torch.randn(
            weight.shape[0], rank, *[1] * len(kernel), generator=generator
        )
    save_safetensors(entries, path)
    return entries


def diffusers_weights(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """A diffusers pipeline's weights in our names, by role."""
    return {
        "unet": unet_keys.from_diffusers_state_dict(pipe.unet.state_dict()),
        "autoencoder": autoencoder_keys.from_diffusers_state_dict(pipe.vae.state_dict()),
        "text_encoder": text_encoder_keys.from_hf_state_dict(pipe.text_encoder.state_dict()),
        "text_encoder_2": text_encoder_keys.from_hf_state_dict(
            pipe.text_encoder_2.state_dict(), projection=True
        ),
    }


def assert_weights_match(ours: Pipeline, theirs: dict) -> None:
    for role, module in ours.components.modules.items():
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, theirs[role][key], atol=2e-5, rtol=1e-5, msg=f"{role}.{key}")


def fresh(sdxl) -> Pipeline:
    ours, _ = sdxl("base")
    return Pipeline(copy.deepcopy(ours.components))


def test_kohya_sdxl_lora_merges_as_diffusers_does(sdxl, tmp_path):
    import diffusers

    ours = fresh(sdxl)
    _, folder = sdxl("base")
    kohya_file(ours.components, tmp_path / "kohya.safetensors")
    before = {role: copy.deepcopy(m.state_dict()) for role, m in ours.components.modules.items()}
    assert ours.load_lora(tmp_path / "kohya.safetensors", strength=0.8) == len(KOHYA)
    changed = {
        (role, key.removesuffix(".weight"))
        for role, m in ours.components.modules.items()
        for key, value in m.state_dict().items()
        if not torch.equal(value, before[role][key])
    }
    assert changed == set(KOHYA.values())
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    theirs.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    theirs.fuse_lora(lora_scale=0.8)
    theirs.unload_lora_weights()
    assert_weights_match(ours, diffusers_weights(theirs))


def test_peft_sdxl_lora_file_merges_as_diffusers_does(sdxl, tmp_path):
    """diffusers writes its own PEFT-format file (text_encoder_2 included); both loaders read it."""
    import diffusers

    ours = fresh(sdxl)
    _, folder = sdxl("base")
    kohya_file(ours.components, tmp_path / "kohya.safetensors")
    theirs = diffusers.StableDiffusionXLPipeline.from_pretrained(folder)
    theirs.load_lora_weights(str(tmp_path / "kohya.safetensors"))
    from peft.utils import get_peft_model_state_dict

    def layers(model):
        return get_peft_model_state_dict(model, adapter_name=model.active_adapters()[0])

    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "peft",
        unet_lora_layers=layers(theirs.unet),
        text_encoder_lora_layers=layers(theirs.text_encoder),
        text_encoder_2_lora_layers=layers(theirs.text_encoder_2),
    )
    theirs.fuse_lora(lora_scale=0.5)
    theirs.unload_lora_weights()
    assert ours.load_lora(tmp_path / "peft" / "pytorch_lora_weights.safetensors", strength=0.5) == len(KOHYA)
    assert_weights_match(ours, diffusers_weights(theirs))


def test_text_encoder_attention_layers_get_the_update(sdxl, tmp_path):
    ours = fresh(sdxl)
    entries = kohya_file(ours.components, tmp_path / "te.safetensors", names=KOHYA_ATTENTION)
    before = {
        name: ours.components.modules[r].get_submodule(p).weight.clone()
        for name, (r, p) in KOHYA_ATTENTION.items()
    }
    assert ours.load_lora(tmp_path / "te.safetensors", strength=0.3) == len(KOHYA_ATTENTION)
    for name, (role, path) in KOHYA_ATTENTION.items():
        update = entries[f"{name}.lora_up.weight"] @ entries[f"{name}.lora_down.weight"]
        after = ours.components.modules[role].get_submodule(path).weight
        torch.testing.assert_close(after - before[name], 0.3 * update, atol=1e-5, rtol=1e-5)


def test_a_lora_of_the_other_family_is_refused_in_one_message(sdxl, tmp_path):
    ours = fresh(sdxl)
    kohya_file(ours.components, tmp_path / "sdxl.safetensors")
    sd1 = ld.load("preset:tiny")
    with pytest.raises(UserError, match="LoRA for SDXL"):
        sd1.load_lora(tmp_path / "sdxl.safetensors")
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    down, up = torch.zeros(2, 32), torch.zeros(32, 2)
    save_safetensors(
        {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}, tmp_path / "sd1.safetensors"
    )
    with pytest.raises(UserError, match=r"LoRA for SD 1\.x/2\.x; this model is SDXL"):
        ours.load_lora(tmp_path / "sd1.safetensors")
