"""The latent-vs-pixel study: its model family, the pixel-space (identity) first stage, and the whole
runner end to end on the toy budget, re-run and resumed."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from latentdiffusion.checkpoints.formats import save_components
from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.components import build_components
from latentdiffusion.errors import UserError
from latentdiffusion.evaluation import latent_vs_pixel as study
from latentdiffusion.evaluation import latent_vs_pixel_report as report
from latentdiffusion.evaluation.plot import PANEL_SIZE
from latentdiffusion.models.autoencoder import IdentityAutoencoder
from latentdiffusion.pipelines.loading import load_pipeline
from latentdiffusion.training.config import validate
from latentdiffusion.training.data import Batch
from latentdiffusion.training.loop import TASKS
from latentdiffusion.training.task import StepRandom

ROOT = Path(__file__).resolve().parents[2]
TOY = study.get_budget("toy")


def load_runner():
    spec = importlib.util.spec_from_file_location(
        "latent_vs_pixel_runner", ROOT / "benchmarks" / "latent_vs_pixel.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ model family


@pytest.mark.parametrize(("f", "levels"), [(1, 5), (2, 4), (4, 3), (8, 2)])
def test_unet_levels_reach_4x4_with_attention_on_the_two_lowest(f, levels):
    config = study.model_config(study.get_budget("default"), f)
    assert config.autoencoder.downsampling_factor == f
    assert config.unet.channel_mult == (1,) + (2,) * (levels - 1)
    assert config.unet.attention_levels == (levels - 2, levels - 1)
    assert 64 // f // 2 ** (levels - 1) == 4
    assert config.unet.model_channels == 64
    assert config.unet.in_channels == config.autoencoder.latent_channels == (3 if f == 1 else 4)


@pytest.mark.parametrize("f", [1, 2, 4, 8])
def test_training_configs_validate(f):
    validate(study.diffusion_train_config(TOY, f, None if f == 1 else "some/export", 10))
    if f > 1:
        config = validate(study.autoencoder_train_config(TOY, f))
        assert config.autoencoder_loss.disc_start == config.max_steps  # the PatchGAN never starts


def test_checkpoints_land_on_log_steps():
    settings = study._run_settings(study.get_budget("default"), 963)
    assert settings["checkpoint_every"] % settings["log_every"] == 0
    assert settings["checkpoint_every"] * study.get_budget("default").checkpoints_per_run >= 963


# ------------------------------------------------------------------------------ identity first stage


def pixel_components():
    return build_components(study.model_config(TOY, 1), seed=0)


def test_identity_autoencoder_is_the_identity():
    components = pixel_components()
    vae = components.autoencoder
    assert isinstance(vae, IdentityAutoencoder)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(vae.to_latent(x, sample=True), x)
    assert torch.equal(vae.from_latent(x), x)
    posterior = vae.encode(x)
    assert torch.equal(posterior.sample(torch.Generator().manual_seed(0)), x)
    assert torch.equal(posterior.std, torch.zeros_like(x))
    assert study.parameters(vae) == 0


def test_identity_autoencoder_refuses_other_channel_counts():
    config = replace(study.autoencoder_config(TOY, 1), latent_channels=4)
    with pytest.raises(ValueError, match="identity"):
        IdentityAutoencoder(config)


def test_pixel_space_diffusion_trains_on_the_image_itself():
    config = study.diffusion_train_config(TOY, 1, None, 1)
    task = TASKS["diffusion"](config, pixel_components(), torch.device("cpu"))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    batch = Batch(x, ["a", "b"], torch.arange(2))
    assert torch.equal(task.latents(batch, StepRandom(0, 0, 2, torch.arange(2))), x)


def test_pixel_space_model_saves_loads_and_generates(tmp_path):
    components = pixel_components()
    save_native(components, tmp_path)
    pipe = load_pipeline(str(tmp_path))
    assert isinstance(pipe.vae, IdentityAutoencoder)
    image = pipe.generate("a red circle on a blue background", steps=1, seed=3)[0]
    again = load_pipeline(str(tmp_path)).generate("a red circle on a blue background", steps=1, seed=3)[0]
    assert image.size == (64, 64) and image.tobytes() == again.tobytes()


def test_pixel_space_model_has_no_diffusers_layout(tmp_path):
    with pytest.raises(UserError, match="pixel space"):
        save_components(pixel_components(), tmp_path, "diffusers")
    assert not (tmp_path / "model_index.json").exists()


# -------------------------------------------------------------------------------------- end to end


def table_rows(page: str) -> list[str]:
    """First cells of the results table's rows."""
    section = page.split("## Results", 1)[1].split("\n\n", 2)[1]
    return [line.split("|")[1].strip() for line in section.splitlines()[2:]]


def result_mtimes(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.glob("*/result.json")}


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory):
    out, docs = tmp_path_factory.mktemp("study"), tmp_path_factory.mktemp("docs")
    runner = load_runner()
    assert runner.main(["--budget", "toy", "--out", str(out), "--docs", str(docs), "--quiet"]) == 0
    return runner, out, docs


def test_runner_writes_table_plot_and_samples(toy_study):
    _, out, docs = toy_study
    page = (docs / "latent-vs-pixel.md").read_text()
    assert table_rows(page) == ["1", "2", "4", "8", "real images"]
    assert "--budget toy" in page and "TFLOP" in page and "## Conclusions" in page
    plot = Image.open(docs / "images" / "latent-vs-pixel.png")
    assert plot.size == (2 * PANEL_SIZE[0], PANEL_SIZE[1])  # two panels
    assert Image.open(docs / "images" / "latent-vs-pixel-samples.png").size == (64 * 8, 64 * 4)
    results = study.run_study(TOY, out, log=lambda message: None)
    panels = report.quality_panels(results)
    assert [len(panel.points) for panel in panels] == [4, 4]
    assert [p.label.split(" ")[0] for p in panels[0].points] == ["f=1", "f=2", "f=4", "f=8"]


def test_each_f_trains_under_the_same_flop_budget(toy_study):
    _, out, _ = toy_study
    diffusion = [json.loads((out / f"diffusion-f{f}" / "result.json").read_text()) for f in (1, 2, 4, 8)]
    flops = [d["flops_per_step"] for d in diffusion]
    assert flops == sorted(flops, reverse=True)  # smaller latents, cheaper steps ...
    assert [d["steps"] for d in diffusion] == [
        max(1, int(TOY.diffusion_flops // f)) for f in flops
    ]  # ... more
    evaluation = json.loads((out / "evaluation-f1" / "result.json").read_text())
    assert evaluation["images"] == 2 * TOY.eval_prompts
    assert 0.0 <= evaluation["adherence"]["all"] <= 1.0 and evaluation["frechet_distance"] >= 0


def test_rerun_skips_finished_stages(toy_study, capsys):
    runner, out, docs = toy_study
    before = result_mtimes(out)
    assert len(before) == 13  # 3 first stages, classifier, 4 diffusion models, 4 evaluations, real images
    assert runner.main(["--budget", "toy", "--out", str(out), "--docs", str(docs)]) == 0
    assert result_mtimes(out) == before
    lines = [line for line in capsys.readouterr().out.splitlines() if ":" in line and "wrote" not in line]
    assert lines and all("skipped" in line for line in lines)


def test_interrupted_stages_continue(toy_study):
    runner, out, docs = toy_study
    training, evaluation = out / "diffusion-f8", out / "evaluation-f8"
    steps = json.loads((training / "result.json").read_text())["steps"]
    (training / "result.json").unlink()
    shutil.rmtree(training / "export")  # as if killed after its last checkpoint
    (evaluation / "result.json").unlink()
    (evaluation / "images" / "00000.png").unlink()  # as if killed while generating the first batch
    batches = len((evaluation / "batches.jsonl").read_text().splitlines())
    assert runner.main(["--budget", "toy", "--out", str(out), "--docs", str(docs), "--quiet"]) == 0
    assert json.loads((training / "result.json").read_text())["steps"] == steps
    assert (training / "export" / "model.safetensors").is_file()
    assert len((evaluation / "batches.jsonl").read_text().splitlines()) == batches + 1


def test_another_budget_needs_another_folder(toy_study, capsys):
    runner, out, docs = toy_study
    study.BUDGETS["toy-other"] = replace(TOY, name="toy-other")
    try:
        assert runner.main(["--budget", "toy-other", "--out", str(out), "--docs", str(docs)]) == 2
    finally:
        del study.BUDGETS["toy-other"]
    assert re.search(r"holds a study with budget 'toy'", capsys.readouterr().err)


def test_unknown_budget_is_a_clear_error(tmp_path, capsys):
    assert load_runner().main(["--budget", "huge", "--out", str(tmp_path)]) == 2
    assert "unknown budget 'huge'; known: default, toy" in capsys.readouterr().err


def test_ldm_bench_runs_the_same_study(toy_study, tmp_path, capsys):
    from latentdiffusion.cli.main import main

    _, out, _ = toy_study
    before = result_mtimes(out)
    assert (
        main(["bench", "latent-vs-pixel", "--budget", "toy", "--out", str(out), "--docs", str(tmp_path)]) == 0
    )
    assert result_mtimes(out) == before
    page = (tmp_path / "latent-vs-pixel.md").read_text()
    assert f"`ldm bench latent-vs-pixel --budget toy --out {out} --docs {tmp_path}`" in page
    assert main(["bench", "latent-vs-pixel", "--budget", "huge", "--out", str(tmp_path / "x")]) == 2
    assert "ldm bench: error: unknown budget 'huge'" in capsys.readouterr().err


def test_rewriting_the_page_keeps_hand_written_conclusions():
    fresh = f"# Study\n\nnew numbers\n\n{report.CONCLUSIONS_HEADING}\n\n{report.PLACEHOLDER_CONCLUSIONS}\n"
    previous = f"# Study\n\nold numbers\n\n{report.CONCLUSIONS_HEADING}\n\nLatent space wins.\n"
    kept = report.keep_conclusions(fresh, previous)
    assert "new numbers" in kept and "old numbers" not in kept
    assert kept.endswith("Latent space wins.\n") and report.PLACEHOLDER_CONCLUSIONS not in kept
    assert report.keep_conclusions(fresh, None) == fresh
