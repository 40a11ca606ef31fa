from PIL import Image

from latentdiffusion.pipelines.metadata import (
    format_parameters,
    parse_parameters,
    read_parameters,
    sampler_display_name,
    save_png,
)


def test_format_matches_the_png_info_convention():
    text = format_parameters(
        "a red circle",
        "blurry",
        {"Steps": 20, "Sampler": "DPM++ 2M Karras", "CFG scale": 7.5, "Seed": 1, "Size": "512x512"},
    )
    assert text == (
        "a red circle\nNegative prompt: blurry\n"
        "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 1, Size: 512x512"
    )


def test_parse_round_trips_multiline_prompts_and_quoted_values():
    settings = {"Steps": "20", "Sampler": "Euler a", "Seed": "7", "Model": "path: a, b"}
    text = format_parameters("line one,\nline two (x:1.2)", "neg, two\nmore", settings)
    parsed = parse_parameters(text)
    assert parsed == {
        "prompt": "line one,\nline two (x:1.2)",
        "negative_prompt": "neg, two\nmore",
        "settings": settings,
    }


def test_parse_without_negative_prompt():
    parsed = parse_parameters("just a prompt\nSteps: 5, Seed: 3")
    assert parsed["prompt"] == "just a prompt"
    assert parsed["negative_prompt"] == ""
    assert parsed["settings"] == {"Steps": "5", "Seed": "3"}


def test_sampler_display_names():
    assert sampler_display_name("dpmpp_2m", "karras") == "DPM++ 2M Karras"
    assert sampler_display_name("euler_ancestral", None) == "Euler a"
    assert sampler_display_name("ddim", "exponential") == "DDIM Exponential"


def test_png_text_chunk_round_trip(tmp_path):
    path = tmp_path / "out" / "image.png"
    text = format_parameters("p", "", {"Steps": 3, "Seed": 9})
    save_png(Image.new("RGB", (8, 8), (1, 2, 3)), path, text)
    assert read_parameters(path) == text
    assert not list(path.parent.glob(".*.tmp")), "the temporary file is renamed away"
