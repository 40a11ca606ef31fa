"""The CompVis inference configs of the released models: our YAML subset reader agrees with PyYAML (a
test-only oracle) and each config describes exactly the matching preset."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentdiffusion.checkpoints.compvis import compvis_dict, compvis_settings, read_compvis_yaml
from latentdiffusion.checkpoints.yaml_subset import dump_yaml, parse_yaml
from latentdiffusion.config import PRESETS
from latentdiffusion.errors import UserError

yaml = pytest.importorskip("yaml")

DATA = Path(__file__).parent / "data"
CONFIGS = {  # file -> (preset, text layout, text layer)
    "v1-inference.yaml": ("sd15", "hf", "last"),
    "v1-inpainting-inference.yaml": ("sd15-inpaint", "hf", "last"),
    "v2-inference-v.yaml": ("sd21-v", "openclip", "penultimate"),
    "x4-upscaling.yaml": ("sd-x4-upscaler", "openclip", "penultimate"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_reader_agrees_with_pyyaml(name):
    text = (DATA / name).read_text()
    assert parse_yaml(text) == yaml.safe_load(text)


@pytest.mark.parametrize("name", CONFIGS)
def test_released_configs_describe_the_presets(name):
    preset, kind, layer = CONFIGS[name]
    settings = read_compvis_yaml(DATA / name)
    expected = PRESETS[preset]
    assert settings.unet == expected.unet
    assert settings.autoencoder == expected.autoencoder
    assert settings.schedule == expected.schedule
    assert (settings.text_kind, settings.text_layer, settings.sample_size) == (
        kind,
        layer,
        expected.sample_size,
    )


@pytest.mark.parametrize("preset", ["sd15", "sd15-inpaint", "sd21-v", "sd-x4-upscaler"])
def test_written_configs_read_back(preset):
    config = PRESETS[preset]
    kind = "openclip" if config.text_encoder.activation == "gelu" else "hf"
    text = dump_yaml(compvis_dict(config, kind))
    assert yaml.safe_load(text) == parse_yaml(text)
    settings = compvis_settings(parse_yaml(text))
    assert (settings.unet, settings.autoencoder, settings.schedule) == (
        config.unet,
        config.autoencoder,
        config.schedule,
    )


def test_unsupported_models_and_yaml_features_are_named(tmp_path):
    sdxl = tmp_path / "sd_xl_base.yaml"
    sdxl.write_text("model:\n  target: sgm.models.diffusion.DiffusionEngine\n  params: {}\n")
    with pytest.raises(UserError, match=r"sgm\.models\.diffusion\.DiffusionEngine"):
        read_compvis_yaml(sdxl)
    clip_skip = (DATA / "v1-inference.yaml").read_text() + "      params:\n        layer: hidden\n"
    (tmp_path / "skip.yaml").write_text(clip_skip)
    with pytest.raises(UserError, match="layer 'hidden'"):
        read_compvis_yaml(tmp_path / "skip.yaml")
    with pytest.raises(ValueError, match="line 2"):
        parse_yaml("a: 1\nb: &anchor 2\n")
    with pytest.raises(ValueError, match="line 1"):
        parse_yaml("a: [1, 2\n")


def test_scalars_and_layouts():
    text = (
        "a:\n- x: 1\n  y: [1.5e-3, [2, 'q']]\n- -7\nb: ~\nc: \"# not a comment\" # a comment\nd: .5\ne: yes\n"
    )
    assert parse_yaml(text) == yaml.safe_load(text)
    data = {"m": {"f": 1e-06, "s": "ldm.models.x", "n": None, "l": [1, 2], "t": True, "q": "a: b", "e": {}}}
    assert parse_yaml(dump_yaml(data)) == data == yaml.safe_load(dump_yaml(data))
