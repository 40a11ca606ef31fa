"""``ldm generate / img2img --lora-dir DIR`` with ``<lora:NAME:WEIGHT>`` tags: the image is the one the
library makes with the file merged at that weight, the PNG info keeps the tags and the Lora hashes, and
bad tags or folders are one line on stderr with exit status 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.cli.main import main
from latentdiffusion.pipelines.metadata import parse_parameters, read_parameters

TO_Q = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # tiny U-Net, [64, 64]
# fp32: --lora merges before the weights are cast to the precision, tags (as in the web UI) after
FAST = ["--model", "preset:tiny", "--steps", "2", "--seed", "4", "--quiet", "--precision", "fp32"]


@pytest.fixture
def lora_dir(tmp_path):
    g = torch.Generator().manual_seed(0)
    entries = {
        f"{TO_Q}.hada_{p}": torch.randn(s, generator=g) for p, s in (("w1_a", (64, 2)), ("w1_b", (2, 64)))
    }
    entries |= {
        f"{TO_Q}.hada_{p}": torch.randn(s, generator=g) for p, s in (("w2_a", (64, 2)), ("w2_b", (2, 64)))
    }
    (tmp_path / "loras" / "sub").mkdir(parents=True)
    save_safetensors(entries, tmp_path / "loras" / "sub" / "ink.safetensors")
    return tmp_path / "loras"


def test_generate_merges_the_tagged_lora_and_records_it(tmp_path, lora_dir):
    out = tmp_path / "out.png"
    sent = "a cat <lora:ink:0.5>"
    assert main(["generate", sent, *FAST, "--size", "32", "--lora-dir", str(lora_dir), "-o", str(out)]) == 0
    merged_by_flag = tmp_path / "flag.png"
    lora = f"{lora_dir / 'sub' / 'ink.safetensors'}:0.5"
    assert main(["generate", "a cat ", *FAST, "--size", "32", "--lora", lora, "-o", str(merged_by_flag)]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(merged_by_flag)))
    assert main(["generate", "a cat ", *FAST, "--size", "32", "-o", str(tmp_path / "plain.png")]) == 0
    assert not np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "plain.png")))
    parsed = parse_parameters(read_parameters(out))
    assert parsed["prompt"] == sent
    assert len(parsed["settings"]["Lora hashes"].removeprefix("ink: ")) == 12


def test_img2img_takes_tags_too(tmp_path, lora_dir):
    source, out = tmp_path / "in.png", tmp_path / "out.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(source)
    code = main(["img2img", str(source), "x <lyco:ink>", *FAST, "--lora-dir", str(lora_dir), "-o", str(out)])
    assert code == 0
    assert parse_parameters(read_parameters(out))["prompt"] == "x <lyco:ink>"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "no LoRA folder was given (--lora-dir)"),
        (["--lora-dir", "missing"], "--lora-dir missing is not a folder"),
    ],
)
def test_bad_tags_and_folders_are_one_line(tmp_path, capsys, extra, message):
    code = main(["generate", "a <lora:ink:1>", *FAST, *extra, "-o", str(tmp_path / "x.png")])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
