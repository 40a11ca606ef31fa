import json

import pytest

from latentdiffusion.errors import UserError
from latentdiffusion.training.config import apply_overrides, config_keys, flatten, from_dict, validate
from latentdiffusion.training.presets import PRESETS, get_train_preset


def test_presets_are_valid_and_round_trip_through_json():
    for name, config in PRESETS.items():
        if config.task == "diffusion":
            validate(apply_overrides(config, {"autoencoder": "random"}))  # the user names the autoencoder
        else:
            validate(config)
        assert from_dict(json.loads(config.to_json())) == config, name


def test_overrides_are_typed_and_nested():
    config = apply_overrides(
        get_train_preset("tiny"),
        {
            "optim.lr": "3e-4",
            "model.unet.model_channels": "64",
            "data.random_flip": "true",
            "optim.betas": "0.8,0.95",
            "sample.prompts": '["a red circle on a blue background", "x"]',
            "diffusion.min_snr_gamma": "none",
            "max_steps": 7,
        },
    )
    assert config.optim.lr == 3e-4
    assert config.model.unet.model_channels == 64
    assert config.data.random_flip is True
    assert config.optim.betas == (0.8, 0.95)
    assert config.sample.prompts == ("a red circle on a blue background", "x")
    assert config.diffusion.min_snr_gamma is None
    assert config.max_steps == 7


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("optim.lrr", "1", "did you mean optim.lr"),
        ("optim.lr", "fast", "bad value for optim.lr"),
        ("batch_size", "2.5", "bad value for batch_size"),
        ("data.random_flip", "maybe", "expected true or false"),
        ("optim.betas", "0.9", "expected 2 values"),
        ("max_steps", True, "got a boolean"),
    ],
)
def test_bad_overrides_name_the_key(key, value, message):
    with pytest.raises(UserError, match=message):
        apply_overrides(get_train_preset("tiny"), {key: value})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.dataset": "cifar"}, "data.dataset must be one of"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"data.caption_dropout": 1.5}, r"data.caption_dropout must be in \[0, 1\]"),
        ({"data.shapes_relational_fraction": -0.1}, r"data.shapes_relational_fraction must be in \[0, 1\]"),
        ({"data.resolution": 34}, "must be a multiple of 4"),
        ({"model.unet.context_dim": 64}, "context_dim"),
        ({"autoencoder": None}, "needs a trained autoencoder"),
        ({"data.cache_latents": True, "data.random_flip": True}, "exclude each other"),
    ],
)
def test_validation_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        validate(apply_overrides(get_train_preset("tiny"), overrides))


def test_preset_of_the_wrong_task_is_refused():
    with pytest.raises(UserError, match="use one of: tiny-autoencoder, shapes-autoencoder"):
        get_train_preset("tiny", "autoencoder")
    with pytest.raises(UserError, match="unknown training preset"):
        get_train_preset("nope")


def test_keys_cover_nested_fields():
    keys = config_keys()
    assert {"optim.lr", "model.unet.channel_mult", "model.schedule.prediction_type", "sample.prompts"} <= set(
        keys
    )
    assert flatten({"a": {"b": 1}, "c": 2}) == {"a.b": 1, "c": 2}
