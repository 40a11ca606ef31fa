"""Recipe probes in the latent-vs-pixel report: their own training FLOPs, their records found beside the
curves', and their table (targets in their own FLOPs)."""

from __future__ import annotations

from pathlib import Path

from latentdiffusion.evaluation import latent_vs_pixel_curves as curves
from latentdiffusion.evaluation import latent_vs_pixel_curves_report as report
from latentdiffusion.evaluation import latent_vs_pixel_probes as probes

ROOT = Path(__file__).resolve().parents[2]
TOY = curves.get_curve_budget("toy")
DEFAULT = curves.get_curve_budget("default")


def scored(step: int, flops: float, colour: float) -> dict:
    return {"step": step, "flops": flops, "adherence": 0.0, "fd": 500.0, "attributes": {"colour": colour}}


def probe_record(f: int, overrides: dict, points: list[dict], own: float | None, budget=TOY) -> dict:
    record = curves.new_results(probes.probe_settings(budget, f, None, overrides))
    record |= {"diffusion": {"flops_per_step": 1e9}, "points": points}
    return record if own is None else record | {probes.OWN_FLOPS: own}


def test_a_probe_with_more_attention_counts_more_flops_a_step_and_a_recipe_change_does_not():
    grid = curves.diffusion_record(TOY, 2)["flops_per_step"]
    # the toy U-Net at f = 2 has cross-attention on its two lowest of four levels
    more = probes.own_flops_per_step(TOY, 2, None, {"model.unet.attention_levels": "1,2,3"})
    assert more > grid
    assert probes.own_flops_per_step(TOY, 2, None, {"optim.lr": "1e-4"}) == grid


def test_own_points_restate_the_grid_points_in_the_probes_own_flops():
    points = [scored(10, 1e10, 0.1), scored(20, 2e10, 0.8)]
    record = probe_record(2, {}, points, own=1.5e9)
    assert [p["flops"] for p in probes.own_points(record)] == [1.5e10, 3e10]
    assert [p["step"] for p in probes.own_points(record)] == [10, 20]
    assert probes.own_points(probe_record(2, {}, points, own=None)) == points  # not counted: the grid's
    assert record["points"][0]["flops"] == 1e10  # the record itself is unchanged


def test_only_probe_records_of_the_budget_are_loaded(tmp_path):
    folder = tmp_path / "probes"
    folder.mkdir()
    curves.write_results(folder / "b-attention.json", probe_record(2, {"x": "1"}, [], 2e9))
    curves.write_results(folder / "a-control.json", probe_record(2, {}, [], 1e9))
    curves.write_results(folder / "other-budget.json", probe_record(2, {}, [], 1e9, budget=DEFAULT))
    curves.write_results(folder / "f4.json", curves.new_results(curves.settings(TOY, 4)))  # a curve's file
    assert list(probes.load_probes(TOY, folder)) == ["a-control", "b-attention"]
    assert probes.load_probes(TOY, tmp_path / "absent") == {}
    assert list(curves.load_curves(TOY, tmp_path).probes) == ["a-control", "b-attention"]


def test_the_probe_table_reaches_targets_in_the_probes_own_flops():
    points = [scored(10, 1e13, 0.2), scored(20, 1e14, 0.9)]
    attention = probe_record(2, {"model.unet.attention_levels": "1,2,3"}, points, own=2e9)
    control = probe_record(2, {}, points[:1], own=1e9)
    table = report.probe_table(curves.Curves(TOY, probes={"attention": attention, "control": control}))
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert "`model.unet.attention_levels=1,2,3`" in rows["attention"]
    assert "| 2.0 (1.0) | 200 T, 2 points |" in rows["attention"]
    assert "| 200 T |" in rows["attention"]  # colour >= 75% at its second point, in its own FLOPs
    assert "none (a control)" in rows["control"]
    assert "not reached (<= 10.0 T trained)" in rows["control"]


def test_the_committed_probes_load_with_their_own_flops_and_join_the_page():
    results = ROOT / "benchmarks" / "results" / "latent-vs-pixel"
    found = curves.load_curves(DEFAULT, results).probes
    assert sorted(found) == sorted(path.stem for path in (results / probes.PROBES_DIR).glob("*.json"))
    for record in found.values():
        assert record[probes.OWN_FLOPS] >= record["diffusion"]["flops_per_step"]
    assert report.probes_text(curves.Curves(DEFAULT)) == ""  # no probes, no section
    assert "Recipe probes" in report.probes_text(curves.load_curves(DEFAULT, results))


def curve(f: int, points: list[dict], seconds: float) -> dict:
    return {"settings": {"f": f}, "points": [p | {"cpu_seconds_per_image": seconds} for p in points]}


def test_the_second_ratio_table_takes_each_fs_best_recipe_and_the_least_trained_bound():
    pixel = curve(1, [scored(1, 1e13, 0.1), scored(2, 1e15, 0.5)], 8.0)  # never reaches colour 75%
    f4 = curve(4, [scored(5, 1e13, 0.8)], 1.0)
    heard = probe_record(1, {"model.unet.attention_levels": "2,3,4"}, [scored(3, 1e14, 0.9)], own=1.1e9)
    heard["points"] = [p | {"cpu_seconds_per_image": 9.0} for p in heard["points"]]
    c = curves.Curves(TOY, {1: pixel, 4: f4}, probes={"f1-heard": heard})
    assert report.ratio_row(c, "colour", 0.75)[1:3] == ["not reached (<= 1,000 T trained)", ">= 100.0x"]
    assert report.ratio_row(c, "colour", 0.75, with_probes=True) == [
        "f=4: 10.0 T", "110 T (f1-heard)", "11.0x", "9.0x"
    ]  # fmt: skip
    # a pixel recipe that reached nothing bounds the ratio by its own training only
    heard["points"] = [scored(3, 2e13, 0.1) | {"cpu_seconds_per_image": 9.0}]
    assert report.ratio_row(c, "colour", 0.75, with_probes=True)[1:] == [
        "not reached (<= 22.0 T trained)", ">= 2.2x", "8.0x"
    ]  # fmt: skip


def test_with_probes_the_plot_gains_a_colour_panel_of_curves_and_probes():
    f4 = curve(4, [scored(5, 1e13, 0.8)], 1.0)
    heard = probe_record(1, {"model.unet.attention_levels": "2,3,4"}, [scored(3, 1e14, 0.5)], own=1.5e9)
    panels = report.curve_panels(curves.Curves(TOY, {4: f4}, probes={"f1-heard": heard}))
    assert len(panels) == 3 and len(report.curve_panels(curves.Curves(TOY, {4: f4}))) == 2
    assert [(s.label, s.points) for s in panels[2].series] == [
        ("f=4", ((10.0, 80.0),)), ("f1-heard", ((150.0, 50.0),))
    ]  # fmt: skip
