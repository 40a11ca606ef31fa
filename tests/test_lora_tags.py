"""<lora:name:weight> tags and LoRA folders (latentdiffusion.lora_tags): names resolved anywhere under the
folder, weights as the web UI reads them, the PNG info it writes, clear errors; ``merged`` merges for a
block and brings every weight and bias back exactly."""

from __future__ import annotations

import copy
import hashlib

import pytest
import torch
from PIL import Image

import latentdiffusion as ld
from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.errors import UserError
from latentdiffusion.lora_tags import LoraLibrary, TagError, merged, record_tags, take_tags
from latentdiffusion.pipelines.metadata import parse_parameters
from latentdiffusion.pipelines.pipeline import Pipeline

TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # tiny U-Net, [64, 64]
TIME = "lora_unet_time_embedding_linear_1"  # a Linear with a bias
TEXT = "lora_te_text_model_encoder_layers_0_mlp_fc1"


def lycoris_entries(pipe: Pipeline, seed: int = 0) -> dict[str, torch.Tensor]:
    """A LoHa on an attention layer and text layer, a full difference with a bias on a time layer."""
    g = torch.Generator().manual_seed(seed)
    time = pipe.unet.time_embedding.linear_1
    fc1 = pipe.text_encoder.layers[0].mlp.fc1
    entries = {
        f"{TIME}.diff": 0.1 * torch.randn(time.weight.shape, generator=g),
        f"{TIME}.diff_b": 0.1 * torch.randn(time.bias.shape, generator=g),
    }
    for name, (out, fan_in) in ((TO_Q, (64, 64)), (TEXT, tuple(fc1.weight.shape))):
        for part, shape in (
            ("w1_a", (out, 2)),
            ("w1_b", (2, fan_in)),
            ("w2_a", (out, 2)),
            ("w2_b", (2, fan_in)),
        ):
            entries[f"{name}.hada_{part}"] = 0.3 * torch.randn(shape, generator=g)
    return entries


@pytest.fixture(scope="module")
def tiny() -> Pipeline:
    return ld.load("preset:tiny")


@pytest.fixture
def folder(tmp_path, tiny):
    (tmp_path / "styles").mkdir()
    save_safetensors(
        lycoris_entries(tiny), tmp_path / "styles" / "ink.safetensors", {"ss_output_name": "inky"}
    )
    save_safetensors(lycoris_entries(tiny, 1), tmp_path / "paper.safetensors")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    return tmp_path


def test_tags_come_out_of_the_prompt_with_their_weights(folder):
    library = LoraLibrary(folder)
    assert library.names() == ["paper", "ink"]  # sorted by path: subfolders are read too
    prompt, uses = take_tags(
        "a cat <lora:ink:0.8>, <lyco:paper:0.5:0.25> <lora:inky:te=0.1:unet=2>", "", library
    )
    assert prompt == "a cat ,  "
    weights = [(use.lora.name, use.text_weight, use.network_weight) for use in uses]
    assert weights == [("ink", 0.8, 0.8), ("paper", 0.5, 0.25), ("ink", 0.1, 2.0)]
    assert take_tags("<lora:paper>", "", library)[1][0].network_weight == 1.0


@pytest.mark.parametrize(
    ("prompt", "negative", "message"),
    [
        ("<lora:nope:1>", "", r"prompt: <lora:nope>: no LoRA of that name \(known: paper, ink\)"),
        ("<hypernet:x:1>", "", "only <lora:...> tags are supported"),
        ("<lora:ink:lots>", "", "'lots' is not a weight"),
        ("<lora:ink:inf>", "", "must be finite"),
        ("<lora:ink:1:2:3>", "", "write <lora:NAME>"),
        ("a", "<lora:ink:1>", "negative_prompt: extra-network tags"),
    ],
)
def test_bad_tags_are_one_clear_error(folder, prompt, negative, message):
    with pytest.raises(TagError, match=message):
        take_tags(prompt, negative, LoraLibrary(folder))


def test_a_tag_without_a_folder_says_so():
    with pytest.raises(UserError, match=r"no LoRA folder was given \(--lora-dir\)"):
        take_tags("<lora:ink:1>", "", LoraLibrary(None))


def test_png_info_keeps_the_tags_and_adds_the_web_uis_lora_hashes(folder):
    library = LoraLibrary(folder)
    sent = "a cat <lora:ink:0.8>"
    prompt, uses = take_tags(sent, "", library)
    image = Image.new("RGB", (8, 8))
    image.info["parameters"] = f"{prompt}\nNegative prompt: ugly\nSteps: 2, Seed: 1"
    record_tags([image], sent, prompt, library, uses)
    data = (folder / "styles" / "ink.safetensors").read_bytes()
    tensors = data[8 + int.from_bytes(data[:8], "little") :]
    parsed = parse_parameters(image.info["parameters"])
    assert parsed["prompt"] == sent and parsed["negative_prompt"] == "ugly"
    assert parsed["settings"]["Lora hashes"] == f"inky: {hashlib.sha256(tensors).hexdigest()[:12]}"
    assert f'Lora hashes: "inky: {hashlib.sha256(tensors).hexdigest()[:12]}"' in image.info["parameters"]


def test_merged_merges_for_the_block_and_restores_every_weight_and_bias(folder, tiny):
    pipe = Pipeline(copy.deepcopy(tiny.components))
    _, uses = take_tags("<lora:ink:0.5:2>", "", LoraLibrary(folder))
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()} | {
        f"te.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()
    }
    expected = Pipeline(copy.deepcopy(tiny.components))
    save_safetensors(
        {k: v for k, v in lycoris_entries(tiny).items() if k.startswith("lora_unet")},
        folder / "u.safetensors",
    )
    save_safetensors(
        {k: v for k, v in lycoris_entries(tiny).items() if k.startswith("lora_te")}, folder / "t.safetensors"
    )
    expected.load_lora(folder / "u.safetensors", 2.0)
    expected.load_lora(folder / "t.safetensors", 0.5)
    with merged(pipe, uses):
        for ours, theirs in ((pipe.unet, expected.unet), (pipe.text_encoder, expected.text_encoder)):
            for (key, value), other in zip(
                ours.state_dict().items(), theirs.state_dict().values(), strict=True
            ):
                assert torch.equal(value, other), key
        assert not torch.equal(pipe.unet.time_embedding.linear_1.bias, before["time_embedding.linear_1.bias"])
    after = dict(pipe.unet.state_dict()) | {f"te.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    with pytest.raises(RuntimeError, match="inside"), merged(pipe, uses):
        raise RuntimeError("inside")
    after = dict(pipe.unet.state_dict()) | {f"te.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in before.items())
