"""``Model hash`` and added settings in PNG-info text (``pipelines.metadata.with_settings``)."""

from latentdiffusion.pipelines.metadata import (
    format_parameters,
    parse_parameters,
    with_model_hash,
    with_settings,
)


def test_the_model_hash_goes_before_the_model_as_the_web_ui_writes_it():
    text = format_parameters("a cat\nsecond line", "dog", {"Steps": 2, "Seed": 1, "Model": "m", "X": "a, b"})
    hashed = with_model_hash(text, "0123456789")
    assert hashed.endswith('Steps: 2, Seed: 1, Model hash: 0123456789, Model: m, X: "a, b"')
    parsed = parse_parameters(hashed)
    assert parsed["prompt"] == "a cat\nsecond line" and parsed["negative_prompt"] == "dog"
    assert parsed["settings"]["Model hash"] == "0123456789" and parsed["settings"]["X"] == "a, b"
    assert with_model_hash(text, None) == text


def test_settings_are_appended_and_quoted():
    text = format_parameters("p", None, {"Steps": 2, "Model": "m"})
    added = with_settings(text, {"Clip skip": 2, "Lora hashes": "style: abc"})
    assert added == 'p\nSteps: 2, Model: m, Clip skip: 2, Lora hashes: "style: abc"'
    assert with_settings("no settings line", {"A": 1}) == "no settings line\nA: 1"
    assert with_settings(text, {}) == text
