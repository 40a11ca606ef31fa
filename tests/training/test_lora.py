"""LoRA: the wrappers' maths, kohya / A1111 files (both U-Net namings, text encoder, PEFT), diffusers as the
oracle of the key names, merging with a strength, and clear errors for bad files."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.lora_keys import kohya_name, load_lora, save_lora
from latentdiffusion.checkpoints.safe_io import read_metadata, read_state_dict, save_safetensors
from latentdiffusion.cli.common import lora_spec
from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.errors import UserError
from latentdiffusion.models.lora import (
    LoRA,
    inject_lora,
    lora_modules,
    lora_state_dict,
    merge_lora,
    remove_lora,
    set_lora_strength,
    unmerge_lora,
)

ALL_TARGETS = ("attention", "ff", "proj", "resnets", "text")


def networks(seed: int = 0) -> dict[str, torch.nn.Module]:
    components = build_components(TINY, seed=seed)
    return {"unet": components.unet, "text_encoder": components.text_encoder}


def inputs(seed: int = 1) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    ids = torch.randint(0, 1000, (2, 7), generator=generator)
    return x, torch.tensor([10.0, 700.0]), ids


@torch.no_grad()
def run(nets: dict[str, torch.nn.Module], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(text states, U-Net output) for fixed inputs."""
    x, t, ids = inputs(seed)
    context = nets["text_encoder"](ids)
    return context, nets["unet"](x, t, context)


def randomize_lora_(nets: dict[str, torch.nn.Module], seed: int = 2) -> None:
    """Non-zero B (the trained state) so that every adapter changes its layer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in nets.values():
            for m in lora_modules(net).values():
                m.lora_up.weight.copy_(0.05 * torch.randn(m.lora_up.weight.shape, generator=generator))


def assert_outputs_close(a, b, atol=1e-5):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


# ------------------------------------------------------------------------------------ the wrappers


def test_zero_initialised_up_changes_nothing():
    nets = networks()
    before = run(nets)
    wrapped = inject_lora(nets, ALL_TARGETS, rank=4, alpha=2)
    assert len(wrapped["unet"]) > 20 and len(wrapped["text_encoder"]) == 12  # 2 layers x (4 attn + 2 mlp)
    after = run(nets)
    for x, y in zip(before, after, strict=True):
        assert torch.equal(x, y)


def test_wrappers_cover_linear_and_conv_layers():
    nets = networks()
    inject_lora(nets, ("proj", "resnets"), rank=3)
    bases = [m.base for m in lora_modules(nets["unet"]).values()]
    # time_emb_proj; 3x3 convs, 1x1 shortcuts and projections
    assert any(isinstance(b, torch.nn.Linear) for b in bases)
    assert any(isinstance(b, torch.nn.Conv2d) for b in bases)
    conv = nets["unet"].down_blocks[0].resnets[0].conv1
    assert isinstance(conv, LoRA) and conv.lora_down.weight.shape == (3, 32, 3, 3)


def test_merge_equals_the_unmerged_forward_and_unmerge_restores():
    nets = networks()
    original = {k: v.clone() for k, v in nets["unet"].state_dict().items()}
    inject_lora(nets, ALL_TARGETS, rank=4, alpha=8)
    randomize_lora_(nets)
    unmerged = run(nets)
    assert not torch.allclose(unmerged[1], run(networks())[1], atol=1e-3)  # the adapters do something
    for net in nets.values():
        merge_lora(net)
    assert_outputs_close(run(nets), unmerged)
    for net in nets.values():
        unmerge_lora(net)
    remove_lora(nets["unet"], merge=False)
    restored = nets["unet"].state_dict()
    assert restored.keys() == original.keys()
    for key, value in original.items():
        torch.testing.assert_close(restored[key], value, atol=1e-6, rtol=0)


def test_strength_scales_the_update():
    nets = networks()
    base = run(networks())[1]
    inject_lora(nets, ("attention",), rank=2, alpha=1)
    randomize_lora_(nets)
    full = run(nets)[1]
    set_lora_strength(nets["unet"], 0.0)
    torch.testing.assert_close(run(nets)[1], base)
    assert nets["unet"].down_blocks[1].attentions[0].blocks[0].attn1.to_q.scale == 0.0
    set_lora_strength(nets["unet"], 1.0)
    torch.testing.assert_close(run(nets)[1], full)


def test_unknown_target_is_refused():
    with pytest.raises(UserError, match="unknown LoRA targets"):
        inject_lora(networks(), ("attention", "everything"))


# ------------------------------------------------------------------------------------------ files


@pytest.mark.parametrize("naming", ["diffusers", "original"])
def test_save_then_load_reproduces_the_adapted_model(tmp_path, naming):
    trained = networks()
    inject_lora(trained, ALL_TARGETS, rank=4, alpha=2)
    randomize_lora_(trained)
    expected = run(trained)
    states = {name: lora_state_dict(net) for name, net in trained.items()}
    path = save_lora(
        tmp_path / "lora.safetensors", states, TINY, metadata={"ss_network_dim": "4"}, naming=naming
    )
    assert read_metadata(path)["ss_network_dim"] == "4"

    fresh = networks()
    count = load_lora(path, fresh)
    assert count == sum(len(lora_modules(net)) for net in trained.values())
    assert_outputs_close(run(fresh), expected)
    load_lora(path, fresh, strength=-1.0)  # merging is linear: the negative strength takes it out
    assert_outputs_close(run(fresh), run(networks()), atol=1e-5)


def test_file_keys_follow_kohya():
    unet, attn = TINY.unet, "down_blocks.1.attentions.0.blocks.0.attn1.to_out"
    assert kohya_name("unet", attn, unet) == f"lora_unet_down_blocks_1_attentions_0_{B0}attn1_to_out_0"
    assert kohya_name("unet", attn, unet, "original") == f"lora_unet_input_blocks_3_1_{B0}attn1_to_out_0"
    conv = "up_blocks.1.resnets.0.conv1"
    assert kohya_name("unet", conv, unet, "original") == "lora_unet_output_blocks_2_0_in_layers_2"
    ff = "mid_block.attention.blocks.0.ff.proj_in"
    assert kohya_name("unet", ff, unet) == f"lora_unet_mid_block_attentions_0_{B0}ff_net_0_proj"
    q = "layers.1.self_attn.q_proj"
    assert kohya_name("text_encoder", q) == "lora_te_text_model_encoder_layers_1_self_attn_q_proj"


# The TINY U-Net: input_blocks 1 (level 0 ResBlock), 2 (downsample), 3 (level 1 ResBlock + transformer);
# middle_block 0-2; output_blocks 0, 1 (level 1, with transformers), 2, 3 (level 0).
B0 = "transformer_blocks_0_"  # inside a transformer, file side
DOWN1, UP01 = "down_blocks.1.attentions.0", "up_blocks.0.attentions.1"
HAND_BUILT = {
    "original": {
        f"lora_unet_input_blocks_3_1_{B0}attn1_to_q": "down_blocks.1.attentions.0.blocks.0.attn1.to_q",
        f"lora_unet_output_blocks_1_1_{B0}attn2_to_out_0": "up_blocks.0.attentions.1.blocks.0.attn2.to_out",
        f"lora_unet_middle_block_1_{B0}ff_net_0_proj": "mid_block.attention.blocks.0.ff.proj_in",
        "lora_unet_input_blocks_3_1_proj_in": "down_blocks.1.attentions.0.proj_in",
        "lora_unet_input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "lora_unet_input_blocks_2_0_op": "down_blocks.0.downsample.conv",
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj": "layers.1.self_attn.v_proj",
    },
    "diffusers": {
        f"lora_unet_down_blocks_1_attentions_0_{B0}attn1_to_q": f"{DOWN1}.blocks.0.attn1.to_q",
        f"lora_unet_up_blocks_0_attentions_1_{B0}attn2_to_out_0": f"{UP01}.blocks.0.attn2.to_out",
        f"lora_unet_mid_block_attentions_0_{B0}ff_net_2": "mid_block.attention.blocks.0.ff.proj_out",
        "lora_unet_up_blocks_0_attentions_0_proj_out": "up_blocks.0.attentions.0.proj_out",
        "lora_unet_down_blocks_0_resnets_0_conv1": "down_blocks.0.resnets.0.conv1",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "up_blocks.0.upsample.conv",
        "lora_unet_time_embedding_linear_1": "time_embedding.linear_1",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": "layers.0.mlp.fc1",
    },
}


def hand_built_entries(nets, names: dict[str, str], rank: int = 2) -> tuple[dict, dict]:
    """A kohya file's entries for ``names`` (conv layers with conv-shaped pairs), and each layer's
    expected update at strength 1."""
    generator = torch.Generator().manual_seed(5)
    entries, expected = {}, {}
    for i, (name, path) in enumerate(names.items()):
        network = "text_encoder" if name.startswith("lora_te") else "unet"
        weight = nets[network].get_submodule(path).weight
        out, fan_in, kernel = weight.shape[0], weight.shape[1], weight.shape[2:]
        down = torch.randn(rank, fan_in, *kernel, generator=generator)
        up = torch.randn(out, rank, *[1 for _ in kernel], generator=generator)
        entries[f"{name}.lora_down.weight"], entries[f"{name}.lora_up.weight"] = down, up
        alpha = None if i % 2 else float(i + 1)  # alpha absent means alpha = rank
        if alpha is not None:
            entries[f"{name}.alpha"] = torch.tensor(alpha)
        scale = (alpha if alpha is not None else rank) / rank
        expected[(network, path)] = scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    return entries, expected


@pytest.mark.parametrize("naming", list(HAND_BUILT))
def test_hand_built_kohya_file_lands_on_the_right_layers(tmp_path, naming):
    nets = networks()
    before = {(n, k): v.clone() for n, net in nets.items() for k, v in net.state_dict().items()}
    entries, expected = hand_built_entries(nets, HAND_BUILT[naming])
    save_safetensors(entries, tmp_path / "hand.safetensors")
    assert load_lora(tmp_path / "hand.safetensors", nets, strength=0.7) == len(expected)
    for (network, key), old in before.items():
        new = nets[network].state_dict()[key]
        path = key.removesuffix(".weight")
        if key.endswith(".weight") and (network, path) in expected:
            torch.testing.assert_close(new - old, 0.7 * expected[(network, path)], atol=1e-5, rtol=1e-4)
        else:
            assert torch.equal(new, old), key


def test_sd2_text_encoder_file_skips_the_layer_sd2_does_not_run(tmp_path):
    """SD 2 files name the OpenCLIP tower in transformers' layout and may carry the last layer, which
    SD 2 skips (the penultimate layer's states condition the U-Net): those entries change nothing."""
    text = replace(TINY.text_encoder, num_layers=3, skip_last_layers=1, activation="gelu")
    components = build_components(replace(TINY, text_encoder=text))
    nets = {"unet": components.unet, "text_encoder": components.text_encoder}
    names = {
        f"lora_te_text_model_encoder_layers_{n}_self_attn_k_proj": f"layers.{n}.self_attn.k_proj"
        for n in (0, 1)
    }
    entries, expected = hand_built_entries(nets, names)
    skipped = "lora_te_text_model_encoder_layers_2_self_attn_k_proj"
    entries |= {
        f"{skipped}.lora_down.weight": torch.ones(2, 32),
        f"{skipped}.lora_up.weight": torch.ones(32, 2),
    }
    save_safetensors(entries, tmp_path / "sd2.safetensors")
    old = nets["text_encoder"].layers[0].self_attn.k_proj.weight.clone()
    assert load_lora(tmp_path / "sd2.safetensors", nets) == 2
    new = nets["text_encoder"].layers[0].self_attn.k_proj.weight
    torch.testing.assert_close(
        new - old, expected[("text_encoder", "layers.0.self_attn.k_proj")], atol=1e-5, rtol=1e-4
    )


def test_peft_file_with_its_alpha_metadata(tmp_path):
    nets = networks()
    layer = nets["unet"].down_blocks[1].attentions[0].blocks[0].attn2.to_k
    a, b = torch.randn(4, layer.in_features), torch.randn(layer.out_features, 4)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    metadata = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 2, "unet.r": 4})}
    save_safetensors(
        {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}, tmp_path / "peft.safetensors", metadata
    )
    old = layer.weight.clone()
    load_lora(tmp_path / "peft.safetensors", nets)
    torch.testing.assert_close(layer.weight - old, 0.5 * b @ a, atol=1e-5, rtol=1e-4)


def test_pipeline_load_lora_and_ld_load_loras(tmp_path):
    source = tmp_path / "model"
    ld.load("preset:tiny").save(source)
    nets = networks()
    inject_lora(nets, ("attention", "text"), rank=2)
    randomize_lora_(nets)
    path = save_lora(tmp_path / "l.safetensors", {n: lora_state_dict(m) for n, m in nets.items()}, TINY)

    pipe = ld.load(str(source))
    assert pipe.load_lora(path, 0.8) == 4 * 2 * 4 + 2 * 6  # 4 transformers, 2 text layers
    loaded = ld.load(str(source), loras=[(path, 0.8)])
    base = ld.load(str(source))
    key = "down_blocks.1.attentions.0.blocks.0.attn2.to_v.weight"
    assert torch.equal(pipe.unet.state_dict()[key], loaded.unet.state_dict()[key])
    assert not torch.allclose(loaded.unet.state_dict()[key], base.unet.state_dict()[key])


def test_cli_lora_spec():
    assert lora_spec("style.safetensors:0.8") == ("style.safetensors", 0.8)
    assert lora_spec("style.safetensors") == ("style.safetensors", 1.0)
    assert lora_spec("dir:with:colons/s.safetensors:-0.5") == ("dir:with:colons/s.safetensors", -0.5)
    assert lora_spec("C:\\loras\\s.safetensors") == ("C:\\loras\\s.safetensors", 1.0)


# ---------------------------------------------------------------------------------- bad LoRA files


TO_K = f"lora_unet_down_blocks_1_attentions_0_{B0}attn2_to_k"
GOOD = {  # applied first in the partial cases: a failing file must not be half applied
    "lora_unet_conv_in.lora_down.weight": torch.ones(2, 4, 3, 3),
    "lora_unet_conv_in.lora_up.weight": torch.ones(32, 2, 1, 1),
}
BAD_FILES = {
    "sdxl-sized": (
        {f"{TO_K}.lora_down.weight": torch.zeros(4, 2048), f"{TO_K}.lora_up.weight": torch.zeros(64, 4)},
        f"does not fit this model: wrongly shaped {TO_K} \\(update \\(64, 2048\\), layer \\(64, 32\\)\\)",
    ),
    "unknown-layers": (
        {
            "lora_unet_input_blocks_7_1_proj_in.lora_down.weight": torch.zeros(4, 64),
            "lora_unet_input_blocks_7_1_proj_in.lora_up.weight": torch.zeros(64, 4),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 32),
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 4),
        },
        "for 2 layers this model does not have: lora_te2_text_model_encoder_layers_0_mlp_fc1, lora_unet_",
    ),
    "loha": ({"lora_unet_conv_in.hada_w1_a": torch.zeros(4, 4)}, "is a LoHa adapter without hada_w1_b"),
    "a-model": ({"unet.conv_in.weight": torch.zeros(32, 4, 3, 3)}, "is not a LoRA file"),
    "dora": (
        {"lora_unet_conv_in.dora_scale": torch.zeros(5)},
        r"wrongly shaped lora_unet_conv_in \(dora_scale \(5,\), layer \(32, 4, 3, 3\)\)",
    ),
    "no-up": ({"lora_unet_conv_out.lora_down.weight": torch.zeros(4, 32, 3, 3)}, "has no lora_up.weight"),
    "not-a-pair": (
        {
            "lora_unet_conv_out.lora_down.weight": torch.zeros(4, 32, 3, 3),
            "lora_unet_conv_out.lora_up.weight": torch.zeros(4, 8),
        },
        "do not form a low-rank pair",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_lora_files_give_a_clear_error_and_change_nothing(tmp_path, case):
    entries, message = BAD_FILES[case]
    if case not in ("loha", "a-model"):
        entries = {**GOOD, **entries}
    save_safetensors(entries, tmp_path / "bad.safetensors")
    nets = networks()
    before = {k: v.clone() for k, v in nets["unet"].state_dict().items()}
    with pytest.raises(UserError, match=message):
        load_lora(tmp_path / "bad.safetensors", nets)
    after = nets["unet"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_file_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.safetensors").write_text("these are not weights")
    with pytest.raises(UserError, match=r"cannot read LoRA file: .*not a checkpoint"):
        load_lora(tmp_path / "notes.safetensors", networks())
    with pytest.raises(UserError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors", networks())


# ------------------------------------------------------------------------- diffusers as the oracle


def diffusers_twin(unet: torch.nn.Module) -> torch.nn.Module:
    """diffusers' UNet2DConditionModel with the same architecture and weights as our ``unet``."""
    diffusers = pytest.importorskip("diffusers")
    from latentdiffusion.checkpoints.diffusers_configs import unet_to_diffusers
    from latentdiffusion.checkpoints.unet_keys import to_diffusers_state_dict

    theirs = diffusers.UNet2DConditionModel.from_config(unet_to_diffusers(TINY.unet, 8))
    theirs.load_state_dict(to_diffusers_state_dict(unet.state_dict()), strict=True)
    return theirs.eval()


@torch.no_grad()
def merge_peft_(model: torch.nn.Module, peft: dict[str, torch.Tensor], scale: float = 1.0) -> int:
    """W += scale * B A for PEFT-named entries (``<module>.lora_A.weight`` / ``lora_B.weight``)."""
    count = 0
    for key, a in peft.items():
        if key.endswith(".lora_A.weight"):
            module = model.get_submodule(key.removesuffix(".lora_A.weight"))
            b = peft[key.replace(".lora_A.", ".lora_B.")]
            module.weight += scale * (b.flatten(1) @ a.flatten(1)).reshape(module.weight.shape)
            count += 1
    return count


@torch.no_grad()
def unet_output(unet: torch.nn.Module, diffusers_model: bool = False) -> torch.Tensor:
    x, t, _ = inputs()
    context = torch.randn(2, 5, TINY.unet.context_dim, generator=torch.Generator().manual_seed(3))
    return unet(x, t, context).sample if diffusers_model else unet(x, t, context)


def test_diffusers_reads_our_file_onto_the_same_layers(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    nets = networks()
    theirs = diffusers_twin(nets["unet"])
    inject_lora(nets, ("attention", "ff", "proj", "resnets"), rank=4)  # alpha = rank: scale 1
    randomize_lora_(nets)
    path = save_lora(tmp_path / "ours.safetensors", {"unet": lora_state_dict(nets["unet"])}, TINY)

    state = {k: v.clone() for k, v in read_state_dict(path).items()}
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    assert set(alphas.values()) == {4.0}
    peft = convert_unet_state_dict_to_peft(
        {k.removeprefix("unet."): v for k, v in converted.items() if k.startswith("unet.")}
    )
    assert merge_peft_(theirs, peft) == len(lora_modules(nets["unet"]))
    torch.testing.assert_close(unet_output(nets["unet"]), unet_output(theirs, True), atol=1e-4, rtol=1e-4)


def test_a_file_written_by_diffusers_kohya_converter_loads(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    nets = networks()
    theirs = diffusers_twin(nets["unet"])
    generator = torch.Generator().manual_seed(7)
    peft = {}
    for name, module in theirs.named_modules():
        if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and (
            "attentions" in name or "resnets" in name
        ):
            out, fan_in, kernel = module.weight.shape[0], module.weight.shape[1], module.weight.shape[2:]
            peft[f"{name}.lora_A.weight"] = 0.1 * torch.randn(3, fan_in, *kernel, generator=generator)
            peft[f"{name}.lora_B.weight"] = 0.1 * torch.randn(
                out, 3, *[1 for _ in kernel], generator=generator
            )
    text_a, text_b = torch.randn(3, 32, generator=generator), torch.randn(32, 3, generator=generator)
    text = "text_encoder.text_model.encoder.layers.1.self_attn.out_proj"
    kohya = convert_state_dict_to_kohya(
        {f"unet.{k}": v for k, v in peft.items()}
        | {f"{text}.lora_A.weight": text_a, f"{text}.lora_B.weight": text_b}
    )
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.alpha" in kohya  # SDXL-style te1 prefix
    save_safetensors({k: v.contiguous() for k, v in kohya.items()}, tmp_path / "diffusers.safetensors")

    old_text = nets["text_encoder"].layers[1].self_attn.out_proj.weight.clone()
    assert load_lora(tmp_path / "diffusers.safetensors", nets, strength=0.5) == len(peft) // 2 + 1
    merge_peft_(theirs, peft, scale=0.5)
    torch.testing.assert_close(unet_output(nets["unet"]), unet_output(theirs, True), atol=1e-4, rtol=1e-4)
    new_text = nets["text_encoder"].layers[1].self_attn.out_proj.weight
    torch.testing.assert_close(new_text - old_text, 0.5 * text_b @ text_a, atol=1e-5, rtol=1e-4)
