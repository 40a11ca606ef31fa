"""LoRA on SD3 through the user's path (``Pipeline.load_lora``, ``ld.load(..., loras=)``): a random
rank-4 PEFT file for the MMDiT and both CLIP encoders gives the image diffusers' StableDiffusion3Pipeline
makes after ``load_lora_weights`` of the same file; the kohya spellings of the same updates merge to the
same weights; a U-Net LoRA on SD3, an MMDiT LoRA on SD / SDXL and a T5 LoRA are refused in one message,
before anything changes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sd3_fixtures import SIZE, TINY_SD3
from sdxl_fixtures import EIGHT_BIT, as_float

import latentdiffusion as ld
from latentdiffusion.errors import UserError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

RANK = 4
ALPHAS = {"transformer": 6.0, "text_encoder": 2.0, "text_encoder_2": 8.0}
PROMPTS = ["a red circle on a blue background", "a large yellow square"]
NEGATIVES = ["", "blurry"]
TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def random_pair(module: torch.nn.Module, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A (A, B) pair for a Linear or Conv2d, small enough that the images stay in range."""
    if isinstance(module, torch.nn.Conv2d):
        a = torch.randn(RANK, module.in_channels, *module.kernel_size, generator=generator)
        b = torch.randn(module.out_channels, RANK, 1, 1, generator=generator)
    else:
        a = torch.randn(RANK, module.in_features, generator=generator)
        b = torch.randn(module.out_features, RANK, generator=generator)
    return a * 0.1, b * 0.1


def peft_lora(pipe) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A random PEFT LoRA in diffusers' names: every Linear / Conv2d of the transformer, the attention and
    MLP layers of both CLIP encoders; alphas in ``lora_adapter_metadata`` as diffusers writes them."""
    generator = torch.Generator().manual_seed(11)
    state, config = {}, {}
    for role in ALPHAS:
        network, modules = getattr(pipe, role), []
        for name, module in network.named_modules():
            adaptable = isinstance(module, torch.nn.Linear | torch.nn.Conv2d)
            if not adaptable or (role != "transformer" and not name.endswith(TEXT_LAYERS)):
                continue
            modules.append(name)
            a, b = random_pair(module, generator)
            state[f"{role}.{name}.lora_A.weight"], state[f"{role}.{name}.lora_B.weight"] = a, b
        config |= {f"{role}.r": RANK, f"{role}.lora_alpha": ALPHAS[role], f"{role}.target_modules": modules}
    return state, {"lora_adapter_metadata": json.dumps(config)}


def kohya_form(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same updates under OneTrainer / kohya names: lora_transformer_, lora_te1_, lora_te2_."""
    prefixes = {
        "transformer": "lora_transformer_",
        "text_encoder": "lora_te1_",
        "text_encoder_2": "lora_te2_",
    }
    out = {}
    for key, value in state.items():
        role, _, rest = key.partition(".")
        path, which = rest.removesuffix(".weight").rsplit(".lora_", 1)
        name = prefixes[role] + path.replace(".", "_")
        out[f"{name}.lora_{'down' if which == 'A' else 'up'}.weight"] = value
        out[f"{name}.alpha"] = torch.tensor(ALPHAS[role])
    return out


@pytest.fixture(scope="module")
def lora_file(sd3_models, diffusers_sd3, tmp_path_factory):
    """(the diffusers folder of the tiny SD3, a PEFT LoRA file for it, its tensors)."""
    _, folder = sd3_models(TINY_SD3)
    state, metadata = peft_lora(diffusers_sd3(TINY_SD3))
    path = tmp_path_factory.mktemp("sd3-lora") / "peft.safetensors"
    save_file(state, path, metadata)
    return folder, path, state


def generate_ours(pipe, start: torch.Tensor) -> np.ndarray:
    images = pipe.generate(
        PROMPTS, negative_prompt=NEGATIVES, width=SIZE, height=SIZE, steps=4, guidance_scale=5.0,
        sampler="euler", latents=start,
    )  # fmt: skip
    return as_float(images)


def generate_theirs(pipe, start: torch.Tensor) -> np.ndarray:
    return pipe(
        PROMPTS, negative_prompt=NEGATIVES, height=SIZE, width=SIZE, num_inference_steps=4,
        guidance_scale=5.0, latents=start.clone(), output_type="np",
    ).images  # fmt: skip


def test_peft_lora_image_matches_diffusers_load_lora_weights(lora_file, diffusers_sd3):
    folder, path, _ = lora_file
    start = torch.randn(2, 16, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(3))
    theirs = diffusers_sd3(TINY_SD3)
    plain = generate_theirs(theirs, start)
    theirs.load_lora_weights(str(path))
    adapted = generate_theirs(theirs, start)
    assert np.abs(adapted - plain).max() > 0.1  # the LoRA changes the image
    pipe = ld.load(str(folder))
    changed = pipe.load_lora(path, 1.0)
    assert changed == len(lora_file[2]) // 2  # one merged layer per A/B pair
    assert np.abs(generate_ours(pipe, start) - adapted).max() <= EIGHT_BIT


def test_kohya_names_and_the_load_option_merge_to_the_same_weights(lora_file, tmp_path):
    folder, path, state = lora_file
    kohya = tmp_path / "kohya.safetensors"
    save_file(kohya_form(state), kohya)
    peft = ld.load(str(folder))
    peft.load_lora(path, 0.7)
    from_kohya = ld.load(str(folder), loras=[(kohya, 0.7)])  # as ldm generate --lora FILE:0.7 loads it
    plain = ld.load(str(folder)).components.modules
    for role in ALPHAS:
        ours, theirs = peft.components.modules[role].state_dict(), from_kohya.components.modules[role]
        assert any(not torch.equal(value, plain[role].state_dict()[key]) for key, value in ours.items())
        for key, value in theirs.state_dict().items():
            assert torch.allclose(value, ours[key], atol=1e-6), (role, key)


def sd3_weights(pipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for role, m in pipe.components.modules.items() for k, v in m.state_dict().items()}


def test_a_unet_lora_on_sd3_and_a_t5_lora_are_refused_before_anything_changes(lora_file, tmp_path):
    folder, _, state = lora_file
    pipe = ld.load(str(folder))
    before = sd3_weights(pipe)
    unet = dict(state)  # a valid MMDiT part, plus one U-Net layer
    unet["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"] = torch.ones(2, 32)
    unet["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"] = torch.ones(32, 2)
    save_file(unet, tmp_path / "unet.safetensors")
    message = r"LoRA for U-Net models \(.*SDXL.*\).*lora_unet_down_blocks_0.*this model is Stable Diffusion 3"
    with pytest.raises(UserError, match=message):
        pipe.load_lora(tmp_path / "unet.safetensors")
    t5 = dict(state)
    t5["text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"] = torch.ones(2, 96)
    t5["text_encoder_3.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight"] = torch.ones(64, 2)
    save_file(t5, tmp_path / "t5.safetensors")
    with pytest.raises(UserError, match=r"the T5 text encoder \(text_encoder_3\)"):
        pipe.load_lora(tmp_path / "t5.safetensors")
    after = sd3_weights(pipe)
    assert all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("family", ["preset:tiny", "sdxl"])
def test_an_mmdit_lora_on_a_unet_model_is_refused(lora_file, sdxl, tmp_path, family):
    _, path, _ = lora_file
    pipe = ld.load(family) if family.startswith("preset:") else sdxl("base")[0]
    before = sd3_weights(pipe)
    described = "Stable Diffusion 1.x/2.x" if family.startswith("preset:") else "SDXL"
    with pytest.raises(UserError, match=rf"LoRA for MMDiT models \(Stable Diffusion 3\).*is {described} "):
        pipe.load_lora(path)
    original = {  # sd-scripts' SD3 names, which share the lora_unet_ prefix with a U-Net's
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": torch.ones(2, 32),
        "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": torch.ones(96, 2),
    }
    save_file(original, tmp_path / "original.safetensors")
    with pytest.raises(UserError, match=r"LoRA for MMDiT models.*joint_blocks_0"):
        pipe.load_lora(tmp_path / "original.safetensors")
    after = sd3_weights(pipe)
    assert all(torch.equal(before[key], after[key]) for key in before)
