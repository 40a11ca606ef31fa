"""LyCORIS files (kohya / LyCORIS names, SD 1.x and SDXL): every adapter kind lands on the layer its name
says, with the update computed here in closed form (einsum / kron), at the strength asked; bad files get
one clear UserError and change nothing."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.pipeline import Pipeline

sys.path.insert(0, str(Path(__file__).parents[1] / "families"))

from sdxl_fixtures import TINY_SDXL

R = 2
B0 = "transformer_blocks_0_"


def randn(*shape: int, generator: torch.Generator) -> torch.Tensor:
    return 0.1 * torch.randn(*shape, generator=generator)


def tucker(core, up, down):  # core[a, b] with up [a, out] and down [b, in]
    return torch.einsum("abkl,ao,bi->oikl", core, up, down)


# kind -> (entries of one layer of weight shape [out, in(, k, k)], its update at strength 1)
def locon_tucker(shape, g):
    out, fan_in, *kernel = shape
    down, mid, up = (
        randn(R, fan_in, 1, 1, generator=g),
        randn(R, R, *kernel, generator=g),
        randn(out, R, 1, 1, generator=g),
    )
    entries = {
        "lora_down.weight": down,
        "lora_up.weight": up,
        "lora_mid.weight": mid,
        "alpha": torch.tensor(1.0),
    }
    return entries, tucker(mid, up.flatten(1).T, down.flatten(1)) / R


def locon(shape, g):
    """Plain LoCon: a k x k lora_down and a 1x1 lora_up (kohya's conv LoRA)."""
    out, fan_in, *kernel = shape
    down, up = randn(R, fan_in, *kernel, generator=g), randn(out, R, 1, 1, generator=g)
    entries = {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(0.5)}
    return entries, (up.flatten(1) @ down.flatten(1)).reshape(shape) * 0.5 / R


def loha(shape, g):
    out, rest = shape[0], torch.Size(shape[1:]).numel()
    w1_a, w1_b, w2_a, w2_b = (randn(*s, generator=g) for s in ((out, R), (R, rest), (out, R), (R, rest)))
    entries = {
        "hada_w1_a": w1_a,
        "hada_w1_b": w1_b,
        "hada_w2_a": w2_a,
        "hada_w2_b": w2_b,
        "alpha": torch.tensor(4.0),
    }
    return entries, ((w1_a @ w1_b) * (w2_a @ w2_b) * 4.0 / R).reshape(shape)


def loha_tucker(shape, g):
    out, fan_in, *kernel = shape
    parts = {
        n: randn(R, out if n.endswith("_a") else fan_in, generator=g)
        for n in ("w1_a", "w1_b", "w2_a", "w2_b")
    }
    t1, t2 = randn(R, R, *kernel, generator=g), randn(R, R, *kernel, generator=g)
    entries = {f"hada_{n}": v for n, v in parts.items()} | {"hada_t1": t1, "hada_t2": t2}
    return entries, tucker(t1, parts["w1_a"], parts["w1_b"]) * tucker(t2, parts["w2_a"], parts["w2_b"])


def lokr(shape, g):
    """w1 whole [2, 2], w2 a pair [out/2, r] [r, in/2(, k, k)]: gamma = alpha / r."""
    out, fan_in, *kernel = shape
    w1, w2_a, w2_b = (
        randn(2, 2, generator=g),
        randn(out // 2, R, generator=g),
        randn(R, fan_in // 2, *kernel, generator=g),
    )
    w2 = (w2_a @ w2_b.flatten(1)).reshape(out // 2, fan_in // 2, *kernel)
    entries = {"lokr_w1": w1, "lokr_w2_a": w2_a, "lokr_w2_b": w2_b, "alpha": torch.tensor(1.0)}
    return entries, torch.kron(w1.reshape(2, 2, *[1] * len(kernel)), w2) / R


def lokr_whole(shape, g):
    """Both halves whole: alpha is not applied."""
    out, fan_in = shape
    w1, w2 = randn(2, 4, generator=g), randn(out // 2, fan_in // 4, generator=g)
    return {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(100.0)}, torch.kron(w1, w2)


def full(shape, g):
    diff = randn(*shape, generator=g)
    return {"diff": diff, "diff_b": randn(shape[0], generator=g)}, diff


def dora(shape, g):
    """A LoRA with DoRA's magnitude per output row: W' = m (W + dW) / ||W + dW||."""
    down, up = randn(R, shape[1], generator=g), randn(shape[0], R, generator=g)
    magnitude = 1 + torch.rand(shape[0], 1, generator=g)
    return {"lora_down.weight": down, "lora_up.weight": up, "dora_scale": magnitude}, (up @ down, magnitude)


SD1 = {  # name -> (role, our module path, kind)
    f"lora_unet_down_blocks_1_attentions_0_{B0}attn1_to_q": (
        "unet",
        "down_blocks.1.attentions.0.blocks.0.attn1.to_q",
        loha,
    ),
    "lora_unet_down_blocks_0_resnets_0_conv1": ("unet", "down_blocks.0.resnets.0.conv1", locon_tucker),
    "lora_unet_output_blocks_2_0_in_layers_2": ("unet", "up_blocks.1.resnets.0.conv1", loha_tucker),
    "lora_unet_up_blocks_0_upsamplers_0_conv": ("unet", "up_blocks.0.upsample.conv", lokr),
    "lora_unet_time_embedding_linear_1": ("unet", "time_embedding.linear_1", full),
    "lora_unet_down_blocks_0_downsamplers_0_conv": ("unet", "down_blocks.0.downsample.conv", locon),
    f"lora_unet_mid_block_attentions_0_{B0}ff_net_2": (
        "unet",
        "mid_block.attention.blocks.0.ff.proj_out",
        dora,
    ),
    "lora_te_text_model_encoder_layers_1_self_attn_v_proj": (
        "text_encoder",
        "layers.1.self_attn.v_proj",
        lokr_whole,
    ),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": ("text_encoder", "layers.0.mlp.fc1", lokr),
}
SDXL = {
    f"lora_unet_input_blocks_3_1_{B0}attn1_to_q": (
        "unet",
        "down_blocks.1.attentions.0.blocks.0.attn1.to_q",
        lokr,
    ),
    "lora_unet_input_blocks_1_0_in_layers_2": ("unet", "down_blocks.0.resnets.0.conv1", locon_tucker),
    "lora_te1_text_model_encoder_layers_1_mlp_fc2": ("text_encoder", "layers.1.mlp.fc2", loha),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": ("text_encoder_2", "layers.0.mlp.fc1", full),
}


def write_file(pipe: Pipeline, names: dict, path: Path) -> dict:
    """A LyCORIS file for ``names``; returns (role, path) -> the update (or DoRA's (dW, magnitude))."""
    generator = torch.Generator().manual_seed(3)
    entries, expected = {}, {}
    for name, (role, module_path, kind) in names.items():
        shape = pipe.components.modules[role].get_submodule(module_path).weight.shape
        parts, update = kind(shape, generator)
        entries |= {f"{name}.{part}": value for part, value in parts.items()}
        expected[(role, module_path)] = (update, parts.get("diff_b"))
    save_safetensors(entries, path)
    return expected


def dora_merge(weight, update, magnitude, strength):
    merged = weight + update
    norm = merged.norm(dim=1, keepdim=True)
    return weight + strength * (magnitude * merged / norm - weight)


def assert_merged(pipe: Pipeline, before: dict, expected: dict, strength: float) -> None:
    for role, module in pipe.components.modules.items():
        for key, new in module.state_dict().items():
            path, _, leaf = key.rpartition(".")
            old = before[role][key]
            if (role, path) not in expected or (leaf == "bias" and expected[(role, path)][1] is None):
                assert torch.equal(new, old), f"{role}.{key} changed"
            elif leaf == "bias":
                torch.testing.assert_close(new, old + strength * expected[(role, path)][1])
            elif isinstance(expected[(role, path)][0], tuple):
                want = dora_merge(old, *expected[(role, path)][0], strength)
                torch.testing.assert_close(new, want, atol=1e-5, rtol=1e-5, msg=key)
            else:
                want = old + strength * expected[(role, path)][0].reshape(old.shape)
                torch.testing.assert_close(new, want, atol=1e-5, rtol=1e-5, msg=key)


def states(pipe: Pipeline) -> dict:
    return {role: copy.deepcopy(m.state_dict()) for role, m in pipe.components.modules.items()}


@pytest.fixture(scope="module")
def sd1() -> Pipeline:
    return ld.load("preset:tiny")


def test_every_kind_merges_into_the_sd1_layer_it_names(sd1, tmp_path):
    pipe = Pipeline(copy.deepcopy(sd1.components))
    expected = write_file(pipe, SD1, tmp_path / "lycoris.safetensors")
    before = states(pipe)
    assert pipe.load_lora(tmp_path / "lycoris.safetensors", strength=0.6) == len(SD1)
    assert_merged(pipe, before, expected, 0.6)


def test_sdxl_names_reach_the_unet_and_both_text_encoders(tmp_path):
    pipe = Pipeline(build_components(TINY_SDXL))
    expected = write_file(pipe, SDXL, tmp_path / "sdxl.safetensors")
    before = states(pipe)
    assert pipe.load_lora(tmp_path / "sdxl.safetensors", strength=-0.5) == len(SDXL)
    assert_merged(pipe, before, expected, -0.5)
    with pytest.raises(UserError, match="LoRA for SDXL"):
        ld.load("preset:tiny").load_lora(tmp_path / "sdxl.safetensors")


CONV_IN = "lora_unet_conv_in"  # [32, 4, 3, 3] in the tiny U-Net
TO_Q = f"lora_unet_down_blocks_1_attentions_0_{B0}attn1_to_q"  # [64, 64], no bias
BAD = {
    "unknown-tensor": ({f"{CONV_IN}.hada_w3": torch.zeros(2)}, "entries that are no LoRA's or LyCORIS"),
    "refused-kind": ({f"{CONV_IN}.oft_blocks": torch.zeros(4, 8, 8)}, "has OFT / BOFT adapter tensors"),
    "ia3": (
        {f"{TO_Q}.weight": torch.zeros(64), f"{TO_Q}.on_input": torch.tensor(0.0)},
        r"has \(IA\)\^3 adapter tensors \(on_input, weight\)",
    ),
    "mixed": (
        {f"{CONV_IN}.hada_w1_a": torch.zeros(32, 2), f"{CONV_IN}.lokr_w1": torch.zeros(2, 2)},
        "has LoHa and LoKr",
    ),
    "factors": (
        {
            f"{CONV_IN}.hada_w1_a": torch.zeros(32, 2),
            f"{CONV_IN}.hada_w1_b": torch.zeros(2, 36),
            f"{CONV_IN}.hada_w2_a": torch.zeros(32, 2),
            f"{CONV_IN}.hada_w2_b": torch.zeros(3, 36),
        },
        "LoHa tensors do not fit together",
    ),
    "incomplete": ({f"{CONV_IN}.lokr_w1": torch.zeros(2, 2)}, "LoKr adapter without lokr_w2_a"),
    "layer-shape": (
        {f"{CONV_IN}.lokr_w1": torch.zeros(2, 2), f"{CONV_IN}.lokr_w2": torch.zeros(16, 4)},
        r"wrongly shaped lora_unet_conv_in \(update \(32, 8\), layer \(32, 4, 3, 3\)\)",
    ),
    "bias": (
        {f"{TO_Q}.diff": torch.zeros(64, 64), f"{TO_Q}.diff_b": torch.zeros(64)},
        r"diff_b \(64,\), layer no bias",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_lycoris_files_give_one_clear_error_and_change_nothing(sd1, tmp_path, case):
    entries, message = BAD[case]
    good = {"lora_unet_conv_out.diff": torch.ones(4, 32, 3, 3)}  # merged first if anything were
    save_safetensors(good | entries, tmp_path / "bad.safetensors")
    pipe = Pipeline(copy.deepcopy(sd1.components))
    before = states(pipe)
    with pytest.raises(UserError, match=message):
        pipe.load_lora(tmp_path / "bad.safetensors")
    assert_merged(pipe, before, {}, 1.0)


def test_sd3s_mmdit_refuses_lycoris_entries_by_name():
    from latentdiffusion.checkpoints.mmdit_lora_keys import parse_mmdit_lora

    name = "lora_transformer_transformer_blocks_0_attn_to_q"
    with pytest.raises(UserError, match=r"LyCORIS adapter entries .* read for the U-Net models"):
        parse_mmdit_lora({f"{name}.hada_w1_a": torch.zeros(2, 2)}, {}, "sd3.safetensors")


def test_comfy_weight_patcher_restores_biases_a_full_difference_changed(sd1, tmp_path):
    from latentdiffusion.serving.comfy.lora import WeightPatcher

    pipe = Pipeline(copy.deepcopy(sd1.components))
    name, layer = "lora_unet_time_embedding_linear_1", pipe.unet.time_embedding.linear_1
    diff = {f"{name}.diff": torch.ones_like(layer.weight), f"{name}.diff_b": torch.ones_like(layer.bias)}
    save_safetensors(diff, tmp_path / "full.safetensors")
    before = states(pipe)
    patcher = WeightPatcher(pipe.components)
    patcher.use([(tmp_path / "full.safetensors", 0.5)], [])
    torch.testing.assert_close(layer.bias.detach(), before["unet"]["time_embedding.linear_1.bias"] + 0.5)
    patcher.restore()
    assert_merged(pipe, before, {}, 1.0)
