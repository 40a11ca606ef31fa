"""MMDiT LoRA files against diffusers' own loader (``SD3Transformer2DModel.load_lora_adapter``, PEFT) as the
oracle: a random rank-4 LoRA on every linear and conv layer of a tiny SD3.5-Medium-style model (the
(scale, shift) modulations and the patch conv included) merged into ours gives diffusers' output; the
same updates in kohya's original-name form (fused q/k/v) give it too."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from latentdiffusion.checkpoints.layout import write_layout
from latentdiffusion.checkpoints.mmdit_keys import (
    mmdit_config_to_diffusers,
    mmdit_from_diffusers,
    mmdit_layout,
)
from latentdiffusion.checkpoints.mmdit_lora_keys import (
    apply_mmdit_lora,
    is_mmdit_lora_key,
    mmdit_lora_targets,
    parse_mmdit_lora,
)
from latentdiffusion.config import MMDiTConfig
from latentdiffusion.errors import UserError
from latentdiffusion.models.lora import adaptable_layers
from latentdiffusion.models.mmdit import MMDiT

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

CONFIG = MMDiTConfig(
    in_channels=4,
    out_channels=6,
    depth=3,
    num_heads=4,
    head_dim=8,
    context_dim=24,
    pooled_dim=20,
    pos_embed_max_size=8,
    sample_size=8,
    qk_norm="rms_norm",
    dual_attention_layers=(0,),
)
RANK, ALPHA = 4, 6.0


def pair() -> tuple[MMDiT, torch.nn.Module]:
    settings = {k: v for k, v in mmdit_config_to_diffusers(CONFIG).items() if k != "_class_name"}
    theirs = diffusers.SD3Transformer2DModel(**settings).eval()
    generator = torch.Generator().manual_seed(0)
    for key, value in theirs.state_dict().items():
        noise = torch.randn(value.shape, generator=generator) * 0.2
        value.copy_(noise + 1 if ".norm" in key and ".linear" not in key else noise)
    ours = MMDiT(CONFIG).eval()
    ours.load_state_dict(mmdit_from_diffusers(theirs.state_dict()))
    return ours, theirs


def peft_lora(theirs: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """A random PEFT LoRA (diffusers names) on every Linear / Conv2d, and its adapter config."""
    generator = torch.Generator().manual_seed(1)
    state, modules = {}, []
    for name, module in theirs.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            a = torch.randn(RANK, module.in_channels, *module.kernel_size, generator=generator)
            b = torch.randn(module.out_channels, RANK, 1, 1, generator=generator)
        elif isinstance(module, torch.nn.Linear):
            a = torch.randn(RANK, module.in_features, generator=generator)
            b = torch.randn(module.out_features, RANK, generator=generator)
        else:
            continue
        modules.append(name)
        state[f"transformer.{name}.lora_A.weight"] = a * 0.2
        state[f"transformer.{name}.lora_B.weight"] = b * 0.2
    config = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA, "transformer.target_modules": modules}
    return state, config


def inputs() -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 6, 4, generator=generator)
    context = torch.randn(2, 7, 24, generator=generator)
    return x, torch.tensor([999.0, 312.5]), context, torch.randn(2, 20, generator=generator)


@pytest.fixture(scope="module")
def oracle():
    """(our model without the LoRA, the PEFT file and its metadata, dense updates in diffusers names,
    diffusers' output without and with the LoRA)."""
    ours, theirs = pair()
    state, config = peft_lora(theirs)
    x, t, context, y = inputs()
    with torch.no_grad():
        plain = theirs(x, context, y, t).sample
        theirs.load_lora_adapter(dict(state), prefix="transformer", metadata=dict(config))
        adapted = theirs(x, context, y, t).sample
    dense = {}
    for name in config["transformer.target_modules"]:
        a, b = state[f"transformer.{name}.lora_A.weight"], state[f"transformer.{name}.lora_B.weight"]
        delta = b.flatten(1) @ a.flatten(1) * (ALPHA / RANK)
        dense[f"{name}.weight"] = delta.reshape(theirs.get_submodule(name).base_layer.weight.shape)
    return ours, state, {"lora_adapter_metadata": json.dumps(config)}, dense, plain, adapted


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert (ours - theirs).abs().max().item() <= 1e-5 * max(1.0, theirs.abs().max().item())


@torch.no_grad()
def test_peft_lora_matches_diffusers_loader(oracle):
    ours, state, metadata, _, plain, adapted = oracle
    model = MMDiT(CONFIG).eval()
    model.load_state_dict(ours.state_dict())
    assert (adapted - plain).abs().max() > 1.0  # the LoRA changes the output
    count = apply_mmdit_lora(parse_mmdit_lora(state, metadata), model)
    assert count == len(adaptable_layers(model))
    x, t, context, y = inputs()
    assert_matches(model(x, t, context, y), adapted)


@torch.no_grad()
def test_kohya_original_names_with_fused_qkv_match_diffusers_loader(oracle):
    """Each stored update in sd-scripts' names: up = the dense update of the original (fused) layer,
    down = the identity (rank = input width, no alpha: scale 1)."""
    ours, _, _, dense, _, adapted = oracle
    original = write_layout(mmdit_from_diffusers(dense), mmdit_layout(""))
    kohya = {}
    for key, delta in original.items():
        name = "lora_unet_" + key.removesuffix(".weight").replace(".", "_")
        rank = delta[0].numel()
        kohya[f"{name}.lora_down.weight"] = torch.eye(rank).reshape(rank, *delta.shape[1:])
        kohya[f"{name}.lora_up.weight"] = delta.reshape(delta.shape[0], rank, *([1] * (delta.ndim - 2)))
    assert "lora_unet_joint_blocks_0_x_block_attn2_qkv.lora_up.weight" in kohya
    model = MMDiT(CONFIG).eval()
    model.load_state_dict(ours.state_dict())
    apply_mmdit_lora(parse_mmdit_lora(kohya), model)
    x, t, context, y = inputs()
    assert_matches(model(x, t, context, y), adapted)


def test_every_layer_has_one_name_per_spelling_and_fused_qkv_split_rows():
    model = MMDiT(CONFIG)
    targets = mmdit_lora_targets(model)
    layers = adaptable_layers(model)
    fused = [name for name in targets if name.endswith("_qkv")]
    # 3 blocks x 2 streams + block 0's attn2
    assert len(fused) == 7
    assert len(targets) == len(layers) + (len(layers) - 3 * len(fused)) + len(fused)
    q, k, v = targets["lora_unet_joint_blocks_2_context_block_attn_qkv"]
    assert (q.path, q.start, q.stop) == ("blocks.2.context.attn.to_q", 0, 32)
    assert (k.path, k.start, k.stop) == ("blocks.2.context.attn.to_k", 32, 64)
    assert (v.path, v.start, v.stop) == ("blocks.2.context.attn.to_v", 64, 96)
    (final,) = targets["lora_transformer_norm_out_linear"]
    assert final.path == "final.modulation" and final.swap
    assert not targets["lora_unet_final_layer_adaLN_modulation_1"][0].swap
    assert all(is_mmdit_lora_key(f"{name}.alpha") for name in targets)
    assert not is_mmdit_lora_key("lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha")


def test_unknown_layers_and_wrong_shapes_are_refused_before_anything_changes():
    model = MMDiT(CONFIG)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    good = {
        "lora_unet_context_embedder.lora_down.weight": torch.ones(2, 24),
        "lora_unet_context_embedder.lora_up.weight": torch.ones(32, 2),
    }
    unknown = {**good, "lora_unet_joint_blocks_9_x_block_mlp_fc1.lora_down.weight": torch.ones(2, 32)}
    unknown["lora_unet_joint_blocks_9_x_block_mlp_fc1.lora_up.weight"] = torch.ones(128, 2)
    with pytest.raises(UserError, match="joint_blocks_9"):
        apply_mmdit_lora(parse_mmdit_lora(unknown), model)
    wrong = {**good, "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.ones(2, 32)}
    wrong["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight"] = torch.ones(32, 2)  # not 96 rows
    with pytest.raises(UserError, match="wrongly shaped lora_unet_joint_blocks_0_x_block_attn_qkv"):
        apply_mmdit_lora(parse_mmdit_lora(wrong), model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(UserError, match="lora_alpha"):
        parse_mmdit_lora({}, {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": "x"})})


def test_strength_and_alpha_scale_the_update():
    model = MMDiT(replace(CONFIG, dual_attention_layers=()))
    weight = model.context_embed.weight.detach().clone()
    down, up = torch.randn(2, 24), torch.randn(32, 2)
    lora = {
        "transformer.context_embedder.lora_A.weight": down,
        "transformer.context_embedder.lora_B.weight": up,
    }
    metadata = {"lora_adapter_metadata": json.dumps({"transformer.lora_alpha": 1.0})}
    apply_mmdit_lora(parse_mmdit_lora(lora, metadata), model, strength=0.5)
    assert torch.allclose(model.context_embed.weight, weight + 0.5 * 0.5 * up @ down, atol=1e-6)
