"""The latent-vs-pixel compute curves: the FLOP checkpoint grid, the results file (append, resume, refusals),
the compute-to-quality table with targets not reached, the curves' plot, and a stage end to end on the toy
budget, extended and resumed on a "new machine" (no run folder)."""

from __future__ import annotations

import importlib.util
import itertools
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from latentdiffusion.config import AutoencoderConfig
from latentdiffusion.errors import UserError
from latentdiffusion.evaluation import latent_vs_pixel as lvp
from latentdiffusion.evaluation import latent_vs_pixel_curves as curves
from latentdiffusion.evaluation import latent_vs_pixel_curves_report as report
from latentdiffusion.evaluation import latent_vs_pixel_probes as probes
from latentdiffusion.evaluation import latent_vs_pixel_report as page_report
from latentdiffusion.evaluation.frechet import load_classifier
from latentdiffusion.evaluation.plot import COLOURS, PANEL_SIZE, scatter_plot
from latentdiffusion.models.autoencoder import IdentityAutoencoder

ROOT = Path(__file__).resolve().parents[2]
TOY = curves.get_curve_budget("toy")
DEFAULT = curves.get_curve_budget("default")


def load_script(name: str):
    """A benchmark script of ``benchmarks/`` as a module (they are not a package)."""
    spec = importlib.util.spec_from_file_location(f"lvp_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_runner():
    return load_script("latent_vs_pixel")


# ------------------------------------------------------------------------------------ the schedule


def test_checkpoints_are_a_log_grid_shared_by_every_budget():
    grid = curves.checkpoint_flops(DEFAULT, 1e15)
    assert len(grid) == 2 * DEFAULT.points_per_decade + 1  # two decades, both ends included
    assert grid[0] == DEFAULT.first_flops and math.isclose(grid[-1], 1e15)
    ratios = [b / a for a, b in itertools.pairwise(grid)]
    assert all(math.isclose(r, 10 ** (1 / DEFAULT.points_per_decade)) for r in ratios)
    longer = curves.checkpoint_flops(DEFAULT, 3e15)  # a larger budget extends the same grid
    assert longer[: len(grid)] == grid and longer[-1] <= 3e15 < longer[-1] * ratios[0]


def test_until_written_to_three_digits_names_its_grid_point():
    assert math.isclose(curves.checkpoint_flops(DEFAULT, 3.16e14)[-1], 10**14.5)  # 3.1623e14
    assert math.isclose(curves.checkpoint_flops(DEFAULT, 5.62e14)[-1], 10**14.75)  # 5.6234e14
    assert math.isclose(curves.checkpoint_flops(DEFAULT, 3.1e14)[-1], 10**14.25)  # well below: not rounded up


def test_until_below_the_first_checkpoint_is_refused():
    with pytest.raises(UserError, match="below the first checkpoint"):
        curves.checkpoint_flops(DEFAULT, 1e12)


def test_checkpoint_steps_spend_at_least_the_flops_without_repeats():
    steps = curves.checkpoint_steps([10.0, 17.8, 31.6, 100.0], flops_per_step=20)
    assert steps == [1, 2, 5]  # 10 and 17.8 both need one step
    assert curves.checkpoint_steps([40.0], flops_per_step=20) == [2]  # exact multiples are not rounded up


# ------------------------------------------------------------------------------- the results file


def point(step: int, flops: float, adherence: float, fd: float, seconds: float = 1.0) -> dict:
    return {"step": step, "flops": flops, "images": 16 * step, "adherence": adherence, "fd": fd,
            "train_seconds": 60.0 * step, "seconds_per_image": seconds,
            "cpu_seconds_per_image": seconds}  # fmt: skip


def test_points_append_in_step_order_and_survive_a_reopen(tmp_path):
    path = tmp_path / "f4.json"
    record = curves.open_results(path, TOY, 4, resume=False)
    record = curves.write_results(path, record)
    curves.append_point(path, record, point(20, 2e12, 0.1, 900.0))
    record = curves.open_results(path, TOY, 4, resume=True)
    record = curves.append_point(path, record, point(10, 1e12, 0.0, 1500.0))
    record = curves.append_point(path, record, point(20, 2e12, 0.2, 800.0))  # a re-measured step replaces
    saved = json.loads(path.read_text())
    assert [p["step"] for p in saved["points"]] == [10, 20] and saved["points"][1]["adherence"] == 0.2
    assert saved == record and saved["settings"] == curves.settings(TOY, 4)
    assert path.stat().st_size < 4096


def test_the_curves_train_on_single_object_scenes_unlike_the_preset():
    # the curves are scored on single-object prompts; the preset's mix (3 of 4 scenes relational) was
    # 4x slower to draw them (docs/latent-vs-pixel.md)
    assert curves.diffusion_config(DEFAULT, 4, None, 1).data.shapes_relational_fraction == 0.0
    mix = replace(DEFAULT, relational_fraction=0.75)
    assert curves.diffusion_config(mix, 4, None, 1).data.shapes_relational_fraction == 0.75
    assert curves.settings(mix, 4) != curves.settings(DEFAULT, 4)  # a mix curve's results stay apart
    assert "on single-object scenes only" in report.setup_text(curves.Curves(DEFAULT))
    assert "(75% of scenes with two objects)" in report.setup_text(curves.Curves(mix))


def test_results_file_needs_resume_and_the_same_settings(tmp_path):
    path = tmp_path / "f4.json"
    curves.write_results(path, curves.open_results(path, TOY, 4, resume=False))
    with pytest.raises(UserError, match="pass --resume"):
        curves.open_results(path, TOY, 4, resume=False)
    with pytest.raises(UserError, match="other settings"):
        curves.open_results(path, DEFAULT, 4, resume=True)


def test_a_first_stage_with_other_weights_is_refused_while_points_exist(tmp_path):
    old, new = {"f": 4, "weights": "aaaa"}, {"f": 4, "weights": "bbbb"}
    curves.check_same_first_stage(old, new, [], tmp_path / "f4.json")  # no points yet: fine
    curves.check_same_first_stage(old, dict(old), [point(1, 1, 0, 1)], tmp_path / "f4.json")
    with pytest.raises(UserError, match="other weights"):
        curves.check_same_first_stage(old, new, [point(1, 1, 0, 1)], tmp_path / "f4.json")


def test_a_first_stage_run_folder_beyond_the_record_is_refused(tmp_path):
    # a leftover checkpoint past the next round would make the round a no-op and the record undercount;
    # the training loop refuses to resume past max_steps
    lvp.run_training(curves.autoencoder_config(TOY, 4, 5), tmp_path)
    with pytest.raises(UserError, match="trained to step 5"):
        curves.first_stage(TOY, 4, tmp_path, None, lambda record: None, lambda line: None)


def test_first_stage_converges_when_a_round_gains_too_little():
    rounds = [{"step": 500, "psnr": 18.0}, {"step": 1000, "psnr": 20.0}]
    assert not curves.converged(rounds[:1], DEFAULT) and not curves.converged(rounds, DEFAULT)
    assert curves.converged([*rounds, {"step": 1500, "psnr": 20.1}], DEFAULT)
    assert curves.converged([{"step": DEFAULT.autoencoder_max_steps, "psnr": 1.0}], DEFAULT)


# ------------------------------------------------------------------------- compute to quality


def stage(f: int, points: list[dict]) -> dict:
    return {"settings": {"f": f}, "first_stage": None, "points": points}


def toy_curves() -> curves.Curves:
    data = {"frechet_distance": 100.0, "adherence_by_form": {"single": 1.0}}
    pixel = stage(1, [point(1, 1e13, 0.0, 5000.0, 8.0), point(2, 1e14, 0.3, 900.0, 8.0)])
    f4 = stage(4, [point(5, 1e13, 0.3, 700.0, 1.0), point(50, 1e14, 0.6, 350.0, 1.0)])
    f8 = stage(8, [point(9, 1e13, 0.26, 450.0, 0.5), point(90, 1e14, 0.4, 390.0, 0.5)])
    return curves.Curves(TOY, {1: pixel, 4: f4, 8: f8}, data)


def test_targets_are_met_at_the_first_checkpoint_that_reaches_them():
    c = toy_curves()
    assert curves.cpu_seconds_per_image(c.stages[4]) == 1.0
    assert report.reached(c.stages[4]["points"], "adherence", 0.5)["step"] == 50
    assert report.reached(c.stages[4]["points"], "fd", 400.0)["step"] == 50  # FD counts downwards
    assert report.reach_cell(c.stages[8], "adherence", 0.25) == "10.0 T"
    assert report.reach_cell(c.stages[8], "adherence", 0.5) == "not reached (<= 100 T trained)"
    assert report.reach_cell(stage(2, []), "adherence", 0.5) == "-"


def test_sampling_cost_is_cpu_time_so_one_and_two_threads_compare():
    one_thread = [point(1, 1e13, 0.3, 900.0, 0.25), point(2, 2e13, 0.3, 800.0, 0.25)]
    two_threads = [p | {"seconds_per_image": 0.13, "cpu_seconds_per_image": 0.26} for p in one_thread]
    f4 = stage(4, [*one_thread, *two_threads])
    assert curves.cpu_seconds_per_image(f4) == pytest.approx(0.255)  # the wall-clock median: 0.19
    c = curves.Curves(TOY, {1: stage(1, [point(3, 1e14, 0.3, 900.0, 5.1)]), 4: f4}, None)
    assert report.ratio_row(c, "adherence", 0.25)[-1] == "20.0x"


def at_second_guidance(p: dict, adherence: float) -> dict:
    return p | {"second_guidance": {"guidance": curves.SECOND_GUIDANCE, "adherence": adherence}}


def test_adherence_targets_count_the_better_guidance_of_a_checkpoint():
    f8 = toy_curves().stages[8]["points"]
    assert report.reached(f8, "adherence", 0.5) is None
    late = [f8[0], at_second_guidance(f8[1], 0.55)]  # 40% at guidance 3, 55% at the second guidance
    assert report.reached(late, "adherence", 0.5)["step"] == 90
    assert report.best_adherence(at_second_guidance(f8[0], 0.1)) == 0.26  # guidance 3 was better there
    assert report.reached(late, "fd", 400.0)["step"] == 90  # FD is the curves' guidance's alone


def with_attributes(p: dict, colour: float | None, second: float | None = None) -> dict:
    p = p | {"attributes": {"colour": colour, "shape": 0.0}}
    if second is not None:
        p = at_second_guidance(p, 0.0)
        p["second_guidance"]["attributes"] = {"colour": second, "shape": 0.0}
    return p


def test_attribute_targets_count_the_better_guidance_and_skip_checkpoints_without_the_attribute():
    pixel = [point(1, 1e13, 0.0, 900.0), point(2, 1e14, 0.0, 900.0), point(3, 1e15, 0.0, 900.0)]
    pixel = [
        with_attributes(pixel[0], None),
        with_attributes(pixel[1], 0.7, 0.8),
        with_attributes(pixel[2], 0.9),
    ]
    assert report.reached(pixel, "colour", 0.75)["step"] == 2  # 70% at guidance 3, 80% at the second
    assert report.reached(pixel, "colour", 0.85)["step"] == 3
    assert report.reached(pixel, "shape", 0.5) is None
    assert report.measured(pixel[0], "colour") is None  # no prompt asked for a colour there
    f4 = [with_attributes(point(5, 1e13, 0.0, 900.0), 0.8)]
    c = curves.Curves(TOY, {1: stage(1, pixel), 4: stage(4, f4)}, None)
    assert report.ratio_row(c, "colour", 0.75)[:3] == ["f=4: 10.0 T", "100 T", "10.0x"]
    # pixel space trained just past the FLOPs f = 4 needed, target not reached: no bound of ">= 1.0x"
    c.stages[4]["points"] = [with_attributes(point(5, 0.99e15, 0.0, 900.0), 0.8)]
    c.stages[1]["points"] = [with_attributes(point(3, 1e15, 0.0, 900.0), 0.5)]
    assert report.ratio_row(c, "colour", 0.75)[1:3] == ["not reached (<= 1,000 T trained)", "-"]


def test_points_table_shows_the_second_guidance_where_it_was_sampled():
    c = toy_curves()
    c.stages[4]["points"][1] = at_second_guidance(c.stages[4]["points"][1], 0.75)
    table = report.points_table(c).splitlines()
    assert "adherence (guidance 3)" in table[0] and f"adherence ({curves.SECOND_GUIDANCE:g})" in table[0]
    rows = {(r[0].strip(), r[1].strip()): [x.strip() for x in r[4:6]]
            for r in (line.split("|")[1:-1] for line in table[2:])}  # fmt: skip
    assert rows[("4", "50")] == ["60.0%", "75.0%"] and rows[("4", "5")] == ["30.0%", "-"]
    adherence = report.curve_panels(c)[1]
    assert [s.label for s in adherence.series][-1] == f"f=4, guidance {curves.SECOND_GUIDANCE:g}"
    assert adherence.series[-1].points == ((100.0, 75.0),)


def test_ratio_is_a_lower_bound_where_pixel_space_did_not_reach_the_target():
    c = toy_curves()
    assert report.ratio_row(c, "adherence", 0.25) == ["f=4: 10.0 T", "100 T", "10.0x", "8.0x"]
    # f=4 reaches 50% at 100 T; pixel space, trained to 100 T, never did: no bound above 1x to claim
    assert report.ratio_row(c, "adherence", 0.5)[1:3] == ["not reached (<= 100 T trained)", "-"]
    # FD <= 2x the floor: f=4 and f=8 both reach it, f=8 first (10 T) -> pixel bound >= 10x
    assert report.ratio_row(c, "fd", 500.0) == [
        "f=8: 10.0 T",
        "not reached (<= 100 T trained)",
        ">= 10.0x",
        "16.0x",
    ]
    assert report.ratio_row(c, "adherence", 0.9) == ["not reached", "-", "-", "-"]


def test_compute_table_has_a_row_per_f_and_the_one_budget_column():
    c = toy_curves()
    table = report.compute_table(c, {1: "0.0% / 4833.00", 4: "3.1% / 1240.42"})
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["1", "4", "8"]
    assert rows[0][-1].strip() == "0.0% / 4833.00" and rows[2][-1].strip() == "-"
    # reconstructions: pixel space is the real images themselves; f = 4 here has no first-stage record
    assert rows[0][4].strip() == "100.0% / 100" and rows[1][4].strip() == "-"
    assert "not reached" in table and "FD <= 2x real (200)" in table.splitlines()[0]
    ratios = report.ratio_table(c).splitlines()
    assert len(ratios) == 2 + len(report.ADHERENCE_TARGETS) + len(report.ATTRIBUTE_TARGETS) + len(
        report.FD_TARGETS
    )
    assert "colour >= 75%" in table.splitlines()[0] and any(r.startswith("| colour >= 75%") for r in ratios)


def test_time_table_adds_first_stage_training_and_sampling_per_f_and_in_all():
    c = toy_curves()
    c.stages[4]["first_stage"] = {"train_seconds": 1800.0}
    c.stages[4]["points"][1] = at_second_guidance(c.stages[4]["points"][1], 0.75)
    for p, threads in zip(c.stages[4]["points"], ("1", "2"), strict=True):
        p["machine"] = f"Some CPU, 2 cores, {threads} torch thread{'s' if threads == '2' else ''}, torch 2"
    rows = {r[0].strip(): [x.strip() for x in r[1:]]
            for r in (line.split("|")[1:-1] for line in report.time_table(c).splitlines()[2:])}  # fmt: skip
    # f = 4: first stage 30 min; training 50 min (its last point's cumulative 60 s x step 50); sampling
    # 2 prompts x 1 s at the first point and 2 x 2 x 1 s at the second (sampled at both guidances)
    assert rows["4"] == ["30", "50", "0", "1, 2", f"{(1800 + 3000 + 6) / 3600:.1f}"]
    assert rows["1"][:2] == ["-", "2"] and rows["1"][3] == "-"  # pixel space: no first stage to train
    total = 1800 + 3000 + 6 + 120 + 2 * 8 * 2 + 5400 + 2 * 0.5 * 2
    assert rows["all"][-1] == f"**{total / 3600:.1f}**"


def test_the_committed_results_load_under_their_budgets():
    # a settings change (a new budget field) must not silently drop the committed curves from the page
    results = ROOT / "benchmarks" / "results" / "latent-vs-pixel"
    mix = curves.load_curves(curves.get_curve_budget("mix"), results / "scene-mix")
    assert sorted(mix.stages) == [1, 2, 4, 8] and mix.data is not None
    on_disk = sorted(int(path.stem[1:]) for path in results.glob("f*.json"))
    assert sorted(curves.load_curves(DEFAULT, results).stages) == on_disk


def test_one_budget_column_reads_the_committed_page():
    column = report.one_budget_column((ROOT / "docs" / "latent-vs-pixel.md").read_text())
    assert sorted(column) == [1, 2, 4, 8]
    assert all(" / " in cell for cell in column.values())
    assert report.one_budget_column(None) == {} and report.one_budget_column("# no table") == {}


# ------------------------------------------------------------------------------------------- plot


def test_curves_plot_draws_one_coloured_line_per_f():
    panels = report.curve_panels(toy_curves())
    assert [len(p.series) for p in panels] == [3, 3]
    assert panels[0].log_x and panels[0].log_y and not panels[1].log_y  # FD spans decades, adherence 0-100
    assert [s.label for s in panels[1].series] == ["f=1", "f=4", "f=8"]
    assert panels[1].series[1].points == ((10.0, 30.0), (100.0, 60.0))
    image = scatter_plot(panels)
    assert image.size == (2 * PANEL_SIZE[0], PANEL_SIZE[1])
    colours = {colour for _, colour in image.getcolors(1 << 20)}
    assert set(COLOURS[:3]) <= colours


def test_an_empty_panel_still_draws():
    empty = report.curve_panels(curves.Curves(TOY))
    assert scatter_plot(empty).size == (2 * PANEL_SIZE[0], PANEL_SIZE[1])


# ------------------------------------------------------------------------------------------- page


def test_the_curves_section_goes_before_the_conclusions_and_both_reports_keep_it():
    page = "# Study\n\ntables\n\n## Conclusions\n\nhand-written\n"
    block = f"{page_report.CURVES_START}\ncurves v1\n{page_report.CURVES_END}"
    first = page_report.with_curves_block(page, block)
    assert first.index("curves v1") < first.index("## Conclusions") and first.endswith("hand-written\n")
    second = page_report.with_curves_block(first, block.replace("v1", "v2"))
    assert "curves v1" not in second and second.count(page_report.CURVES_START) == 1
    regenerated = "# Study\n\nnew tables\n\n## Conclusions\n\nplaceholder\n"
    kept = page_report.with_curves_block(page_report.keep_conclusions(regenerated, second),
                                         page_report.curves_block(second))  # fmt: skip
    assert "new tables" in kept and "curves v2" in kept and kept.endswith("hand-written\n")


# ------------------------------------------------------------------------------------- end to end


def run(runner, *options: str) -> int:
    return runner.main(["--curves", "--budget", "toy", "--quiet", *options])


@pytest.fixture(scope="module")
def toy_stage(tmp_path_factory):
    root = tmp_path_factory.mktemp("curves")
    out, results, docs = root / "runs", root / "results", root / "docs"
    shutil.copy(ROOT / "docs" / "latent-vs-pixel.md", root / "page.md")
    docs.mkdir()
    shutil.copy(root / "page.md", docs / "latent-vs-pixel.md")
    runner = load_runner()
    args = ["--out", str(out), "--results", str(results), "--docs", str(docs)]
    assert run(runner, "--stage", "f4", "--until", "1.1e9", *args) == 0  # one checkpoint
    return runner, args, out, results, docs


def test_stage_records_first_stage_and_points(toy_stage):
    results = toy_stage[3]
    record = json.loads((results / "f4.json").read_text())
    ae = record["first_stage"]
    assert ae["converged"] and [h["step"] for h in ae["history"]] == [1, 2] and ae["train_flops"] > 0
    ceiling = ae["reconstruction"]  # the real images through this first stage, scored once
    assert 0.0 <= ceiling["adherence"] <= 1.0 and ceiling["fd"] >= 0
    flops = record["diffusion"]["flops_per_step"]
    expected = curves.checkpoint_steps(curves.checkpoint_flops(TOY, 1.1e9), flops)
    assert [p["step"] for p in record["points"]] == expected
    for p in record["points"]:
        assert 0.0 <= p["adherence"] <= 1.0 and p["fd"] >= 0 and p["flops"] == p["step"] * flops
        second = p["second_guidance"]  # every checkpoint is sampled at the second guidance too
        assert second["guidance"] == curves.SECOND_GUIDANCE and 0.0 <= second["adherence"] <= 1.0
        images = toy_stage[2] / "curves" / "evaluation-f4" / f"step-{p['step']:06d}" / "guidance-1.5"
        assert len(list(images.glob("images/*.png"))) == TOY.prompts
    assert (results / "classifier.safetensors").stat().st_size < 500_000  # fp16, committed
    assert sum(p.stat().st_size for p in results.glob("*.json")) < 20_000


def test_a_lossless_first_stage_scores_what_the_real_images_score(toy_stage, monkeypatch):
    results = toy_stage[3]
    identity = IdentityAutoencoder(AutoencoderConfig(latent_channels=3, identity=True))
    monkeypatch.setattr(curves, "load_components", lambda export: SimpleNamespace(autoencoder=identity))
    classifier = load_classifier(results / curves.CLASSIFIER_WEIGHTS)
    reference = lvp.LazyReference(TOY.study, classifier)
    scores = curves.reconstruction_scores(TOY, "unused", classifier, reference)
    data = json.loads((results / curves.CLASSIFIER_FILE).read_text())["data"]
    assert scores["adherence"] == data["adherence_by_form"]["single"] == 1.0
    assert scores["fd"] == pytest.approx(data["frechet_distance"], rel=1e-6)
    row = report.compute_table(curves.load_curves(TOY, results), {}).splitlines()[2].split("|")
    assert row[1].strip() == "4" and "% / " in row[5]  # f = 4's reconstructions column


def test_report_section_and_plot_are_written(toy_stage):
    _, _, _, _, docs = toy_stage
    page = (docs / "latent-vs-pixel.md").read_text()
    section = page_report.curves_block(page)
    assert section is not None and page.index(section) < page.index("## Conclusions")
    assert "## Results" in page and "Rombach" in page  # the one-budget part is kept
    assert "| 4 | 4x16x16 |" in section and "--curves --budget toy" in section
    assert Image.open(docs / "images" / "latent-vs-pixel-curves.png").size == (
        2 * PANEL_SIZE[0],
        PANEL_SIZE[1],
    )


def test_continuing_needs_resume_and_extends_without_re_evaluating(toy_stage, capsys):
    runner, args, _, results, _ = toy_stage
    before = json.loads((results / "f4.json").read_text())["points"]
    assert run(runner, "--stage", "f4", "--until", "3.2e9", *args) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert run(runner, "--stage", "f4", "--until", "3.2e9", "--resume", *args) == 0
    after = json.loads((results / "f4.json").read_text())["points"]
    assert after[: len(before)] == before and len(after) > len(before)


def test_a_new_machine_retrains_and_continues_the_curve(toy_stage):
    runner, args, out, results, _ = toy_stage
    record = json.loads((results / "f4.json").read_text())
    shutil.rmtree(out)  # the run folder (checkpoints, first-stage export) is lost; the results are not
    assert run(runner, "--stage", "f4", "--until", "1.1e10", "--resume", *args) == 0
    again = json.loads((results / "f4.json").read_text())
    assert again["first_stage"]["weights"] == record["first_stage"]["weights"]  # deterministic retraining
    assert again["points"][: len(record["points"])] == record["points"]
    assert len(again["points"]) > len(record["points"])


def test_a_new_curve_takes_over_another_files_first_stage_without_training_it(toy_stage, tmp_path, capsys):
    runner, _, out, results, _ = toy_stage
    donor, recorded = results / "f4.json", json.loads((results / "f4.json").read_text())["first_stage"]
    fresh, docs, runs = tmp_path / "results", tmp_path / "docs", tmp_path / "runs"
    fresh.mkdir(), docs.mkdir()
    for name in (curves.CLASSIFIER_FILE, curves.CLASSIFIER_WEIGHTS):
        shutil.copy(results / name, fresh / name)
    args = [
        "--out",
        str(runs),
        "--results",
        str(fresh),
        "--docs",
        str(docs),
        "--first-stage-from",
        str(donor),
    ]
    assert run(runner, "--stage", "f4", "--until", "1.1e9", *args) == 0
    record = json.loads((fresh / "f4.json").read_text())
    taken, copied = record["first_stage"], runs / "curves" / "autoencoder-f4"
    assert taken["weights"] == recorded["weights"] and taken["history"] == recorded["history"]
    assert taken["export"] == str(copied / "export") and record["points"]
    # not trained again: the copied run folder's log is the donor's, line for line
    donor_log = out / "curves" / "autoencoder-f4" / "metrics.jsonl"
    assert (copied / "metrics.jsonl").read_text() == donor_log.read_text()
    assert run(runner, "--stage", "f4", "--until", "1.1e9", "--resume", *args) == 2
    assert "has its first stage already" in capsys.readouterr().err
    assert run(runner, "--stage", "f1", "--until", "1.1e9", *args) == 2
    assert "no first stage to take over" in capsys.readouterr().err


def test_taking_over_a_first_stage_checks_its_settings_folder_and_weights(toy_stage, tmp_path):
    results = toy_stage[3]
    saved = json.loads((results / "f4.json").read_text())

    def donor(name: str, change) -> Path:
        record = json.loads(json.dumps(saved))
        change(record)
        curves.write_results(tmp_path / name, record)
        return tmp_path / name

    other_round = donor("round.json", lambda r: r["settings"]["budget"].update(autoencoder_round=99))
    with pytest.raises(UserError, match="other first-stage settings"):
        curves.adopt_first_stage(TOY, 4, other_round, tmp_path / "a")
    with pytest.raises(UserError, match="another f"):
        curves.adopt_first_stage(TOY, 2, results / "f4.json", tmp_path / "b")
    mix = donor("mix.json", lambda r: r["settings"]["budget"].update(relational_fraction=0.75, name="mix"))
    assert curves.first_stage_settings(
        json.loads(mix.read_text())["settings"]
    ) == curves.first_stage_settings(curves.settings(TOY, 4))  # the scene mix is not a first-stage setting
    gone = donor("gone.json", lambda r: r["first_stage"].update(export=str(tmp_path / "lost" / "export")))
    with pytest.raises(UserError, match="not on this machine"):
        curves.adopt_first_stage(TOY, 4, gone, tmp_path / "c")
    forged = donor("forged.json", lambda r: r["first_stage"].update(weights="0" * 16))
    with pytest.raises(UserError, match="other weights"):
        curves.adopt_first_stage(TOY, 4, forged, tmp_path / "d")
    assert not (tmp_path / "d").exists() and not (tmp_path / "d.partial").exists()  # nothing left behind
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(UserError, match="not a curve's results file"):
        curves.adopt_first_stage(TOY, 4, tmp_path / "broken.json", tmp_path / "g")
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="exists already"):
        curves.adopt_first_stage(TOY, 4, results / "f4.json", tmp_path / "e")
    unconverged = donor("training.json", lambda r: r["first_stage"].update(converged=False))
    with pytest.raises(UserError, match="no converged first stage"):
        curves.adopt_first_stage(TOY, 4, unconverged, tmp_path / "f")


def test_a_probe_trains_the_changed_recipe_on_the_curve_grid_and_is_set_beside_it(toy_stage, capsys):
    _, _, out, results, _ = toy_stage
    curve = json.loads((results / "f4.json").read_text())
    probe, folder = load_script("latent_vs_pixel_probe"), out.parent / "probe"
    options = ["--f", "4", "--budget", "toy", "--results", str(results), "--out", str(folder), "--quiet"]
    change = ["--first-stage", curve["first_stage"]["export"], "--set", "data.shapes_relational_fraction=0.5"]
    assert probe.main([*options, *change, "--until", "1.1e9"]) == 0
    table = capsys.readouterr().out
    record = json.loads((folder / "f4.json").read_text())
    assert record["settings"]["probe"]["overrides"] == {"data.shapes_relational_fraction": "0.5"}
    assert [p["step"] for p in record["points"]] == [p["step"] for p in curve["points"]][:1]
    trained = json.loads((folder / "diffusion-f4" / "config.json").read_text())
    assert trained["data"]["shapes_relational_fraction"] == 0.5  # the change reached the training run
    assert record[probes.OWN_FLOPS] == curve["diffusion"]["flops_per_step"]  # same network, same FLOPs
    first = record["points"][0]
    assert table.splitlines()[2].startswith(f"| {first['step']} |") and table.count("%") == 10
    assert probe.main([*options, "--set", "data.shapes_relational_fraction=0.25", "--until", "1.1e9"]) == 2
    assert "holds another probe" in capsys.readouterr().err  # one probe per folder
    assert probe.main([*options, "--set", "nonsense=1", "--until", "1.1e9"]) == 2
    assert "unknown config key" in capsys.readouterr().err


def test_a_probe_without_a_first_stage_trains_and_records_the_studys_own(toy_stage, capsys):
    results, folder = toy_stage[3], toy_stage[2].parent / "probe-own"
    probe = load_script("latent_vs_pixel_probe")
    options = ["--f", "2", "--budget", "toy", "--results", str(results), "--out", str(folder), "--quiet"]
    assert probe.main([*options, "--set", "optim.lr=1e-4", "--until", "1.1e9", "--name", "lr"]) == 0
    record = json.loads((folder / "f2.json").read_text())
    committed = results / probes.PROBES_DIR / "lr.json"  # --name: the copy the report reads
    assert curves.load_curves(TOY, results).probes == {"lr": record}
    committed.unlink()  # the module's other tests see the results without it
    assert record["first_stage"]["converged"] and "adherence" in record["first_stage"]["reconstruction"]
    assert record["points"] and record["diffusion"]["flops_per_step"] > 0
    assert "| - |" in capsys.readouterr().out  # no committed f = 2 curve beside it


def test_bad_curve_options_are_clear_errors(tmp_path, capsys):
    runner = load_runner()
    assert run(runner, "--stage", "f4", "--results", str(tmp_path), "--docs", str(tmp_path)) == 2
    assert "needs --until" in capsys.readouterr().err
    assert runner.main(["--stage", "f4", "--until", "1e12", "--out", str(tmp_path)]) == 2
    assert "belong to --curves" in capsys.readouterr().err
    assert run(runner, "--first-stage-from", str(tmp_path / "f4.json"), "--results", str(tmp_path)) == 2
    assert "belong to a curve stage" in capsys.readouterr().err  # the report trains nothing
    assert runner.main(["--curves", "--budget", "huge", "--results", str(tmp_path)]) == 2
    assert "unknown curve budget 'huge'" in capsys.readouterr().err
    curves.write_results(tmp_path / curves.CLASSIFIER_FILE, {"settings": {"name": "other"}})
    assert run(runner, "--stage", "classifier", "--results", str(tmp_path), "--docs", str(tmp_path)) == 2
    assert "another budget's curves" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        runner.main(["--curves", "--until", "lots"])


def test_scoring_a_finished_model_reproduces_its_curve_point(toy_stage, capsys):
    _, _, out, results, _ = toy_stage
    last = json.loads((results / "f4.json").read_text())["points"][-1]  # the run's export is this checkpoint
    probe, folder = load_script("latent_vs_pixel_probe"), out.parent / "scores"
    options = ["--budget", "toy", "--results", str(results), "--out", str(folder)]
    export = str(out / "curves" / "diffusion-f4" / "export")
    assert probe.main([*options, "--score", export]) == 0
    score = json.loads(capsys.readouterr().out)
    assert score["guidance"] == TOY.study.guidance_scale
    assert score["adherence"] == last["adherence"] and score["attributes"] == last["attributes"]
    assert score["fd"] == pytest.approx(last["fd"], rel=1e-6)
    assert probe.main([*options, "--score", export, "--guidance", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["guidance"] == 1.0
    assert len(list(folder.glob("score-export-guidance-*"))) == 2
    with pytest.raises(SystemExit):  # a probe, unlike a score, needs its factor (and --until)
        probe.main(["--out", str(folder), "--until", "1e9"])
