"""Consistency distillation (``ldm finetune --lcm``) on a tiny model at 32 px: the guided teacher's step is
diffusers' DDIM step, the student's parameterisation meets its boundary condition, LoRA students use the
adapter-free network as teacher, resume is bit-exact, and the CLI records, resumes and refuses options."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.cli.main import main
from latentdiffusion.diffusion.process import process_from_config
from latentdiffusion.errors import UserError
from latentdiffusion.families.base import ConditioningRequest, MicroConditioning
from latentdiffusion.models.lora import inject_lora, lora_modules
from latentdiffusion.training.consistency import (
    ConsistencyDistillationTask,
    ConsistencyOptions,
    distillation_grid,
)
from latentdiffusion.training.data import Batch
from latentdiffusion.training.finetune import finetune, finetune_config
from latentdiffusion.training.losses import vp_x0_eps
from latentdiffusion.training.task import StepRandom

CPU = torch.device("cpu")
FAST = ["--quiet", "--data.dataset=shapes", "--data.resolution=32", "--data.holdout=2", "--batch_size=2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random model folder."""
    root = tmp_path_factory.mktemp("lcm")
    ld.load("preset:tiny").save(root / "model")
    return root / "model"


def v_model(components):
    """The tiny model with the default model's schedule: v-prediction, zero terminal SNR, trailing."""
    schedule = replace(
        components.config.schedule,
        prediction_type="v_prediction",
        rescale_zero_terminal_snr=True,
        timestep_spacing="trailing",
        steps_offset=0,
    )
    return replace(components, config=replace(components.config, schedule=schedule))


def task_for(components, **options) -> ConsistencyDistillationTask:
    config = finetune_config("tiny", components.config, lora=False, overrides={"data.resolution": 32})
    return ConsistencyDistillationTask(config, components, CPU, ConsistencyOptions(**options))


def batch(n: int = 3) -> Batch:
    x = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    return Batch(x, ["a red circle", "a blue square", "a green triangle"][:n], torch.arange(n))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_and_eps_are_recovered_from_each_prediction_type(prediction_type):
    process = process_from_config(replace(ld.load("preset:tiny").components.config.schedule))
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([19, 500, 980])
    z = process.add_noise(x0, eps, t)
    target = process.training_target(prediction_type, x0, eps, t)
    alpha_bar = process.alphas_cumprod(t).reshape(-1, 1, 1, 1)
    x0_back, eps_back = vp_x0_eps(prediction_type, z, target, alpha_bar)
    torch.testing.assert_close(x0_back, x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(eps_back, eps, atol=2e-4, rtol=1e-4)


def test_the_grid_is_the_lcm_samplers():
    from latentdiffusion.diffusion.schedules import lcm_timesteps

    grid = distillation_grid(1000)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    assert set(lcm_timesteps(4, 1000).astype(int)) <= set(grid.tolist())


def test_the_teacher_step_is_diffusers_guided_ddim_step():
    diffusers = pytest.importorskip("diffusers")
    components = v_model(ld.load("preset:tiny").components)
    task = task_for(components, guidance=3.0)
    items = batch()
    z_t = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([999, 519, 19])
    requests = task.condition_requests(items)
    cond = task.family.training_condition(components, items.captions, requests)
    with torch.no_grad():
        ours = task.teacher_step(z_t, t, (t - 20).clamp(min=0), cond, items)
        uncond = task.family.training_condition(components, [""] * 3, requests)
        v_c = task.network(z_t, t, **cond)
        v_u = task.network(z_t, t, **uncond)
    schedule = components.config.schedule
    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=schedule.beta_start,
        beta_end=schedule.beta_end,
        beta_schedule=schedule.beta_schedule,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        set_alpha_to_one=False,
        clip_sample=False,
    )
    scheduler.set_timesteps(50)
    guided = v_u + 3.0 * (v_c - v_u)
    for i in range(3):
        expected = scheduler.step(guided[i : i + 1], int(t[i]), z_t[i : i + 1], eta=0.0).prev_sample
        torch.testing.assert_close(ours[i : i + 1], expected, atol=1e-5, rtol=1e-5)


def test_the_student_is_the_identity_at_time_zero_and_its_x0_at_high_noise():
    components = v_model(ld.load("preset:tiny").components)
    task = task_for(components)
    items = batch()
    z = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    cond = task.family.training_condition(components, items.captions, task.condition_requests(items))
    with torch.no_grad():
        at_zero = task.consistency(task.network, z, torch.zeros(3, dtype=torch.long), cond)
        late = torch.full((3,), 999)
        x0, _ = task.x0_eps(task.network, z, late, cond)
        at_999 = task.consistency(task.network, z, late, cond)
    torch.testing.assert_close(at_zero, z)
    torch.testing.assert_close(at_999, x0, atol=1e-5, rtol=1e-5)


def test_guidance_distillation_regresses_the_guided_teacher(overfit, shapes_batch):
    components = v_model(ld.load("preset:tiny").components)  # a full student: the teacher is a copy
    items = shapes_batch(2)
    unguided = task_for(components, objective="guidance", guidance=1.0)
    with torch.no_grad():  # with w = 1 the target is the student's own conditional output
        loss, _ = unguided.losses(unguided.forward_modules(), items, StepRandom(0, 0, 2, items.positions), 0)
    assert loss["model"].item() < 1e-10
    task = task_for(components, objective="guidance", guidance=4.0)
    losses = overfit(task, items, steps=30, lr=1e-3)
    assert losses[0] > 1e-4 and losses[-1] < 0.5 * losses[0]


def test_a_lora_students_teacher_is_the_network_without_adapters():
    components = ld.load("preset:tiny").components
    network = components.network
    items = batch()
    requests = [ConditioningRequest(32, 32, MicroConditioning())] * 3
    cond = components.family.training_condition(components, items.captions, requests)
    z, t = torch.randn(3, 4, 4, 4), torch.tensor([999, 500, 19])
    with torch.no_grad():
        before = network(z, t, **cond)
    inject_lora({"unet": network}, ("attention",), rank=2)
    for adapter in lora_modules(network).values():
        torch.nn.init.normal_(adapter.lora_up.weight, std=0.5)
    task = task_for(components)
    assert task.teacher is None  # no copy: the adapters are switched off
    with torch.no_grad(), task.teacher_network() as teacher:
        torch.testing.assert_close(teacher(z, t, **cond), before)
    with torch.no_grad():
        assert not torch.allclose(network(z, t, **cond), before, atol=1e-4)  # adapters back on
    assert all(a.strength == 1.0 for a in lora_modules(network).values())


def test_a_full_student_keeps_its_starting_network_as_teacher_across_resume(
    tiny, tmp_path, monkeypatch, interrupt_after
):
    components = ld.load(str(tiny)).components
    overrides = {
        "data.dataset": "shapes",
        "data.resolution": 32,
        "data.holdout": 2,
        "batch_size": 2,
        "max_steps": 4,
        "checkpoint_every": 2,
        "optim.lr": 1e-3,
        "optim.warmup_steps": 0,
    }
    config = finetune_config(str(tiny), components.config, lora=False, overrides=overrides)
    options = ConsistencyOptions(guidance=2.0)
    finetune(config, tmp_path / "straight", consistency=options)
    interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(config, tmp_path / "resumed", consistency=options)
    monkeypatch.undo()
    finetune(config, tmp_path / "resumed", resume=True, consistency=options)
    load = lambda run: torch.load(run / "checkpoints/step-00000004.pt", weights_only=True)  # noqa: E731
    straight, resumed = load(tmp_path / "straight"), load(tmp_path / "resumed")
    for name, tensor in straight["networks"]["unet"].items():
        assert torch.equal(tensor, resumed["networks"]["unet"][name]), name
    exported = json.loads((tmp_path / "straight/export/latentdiffusion.json").read_text())["config"]
    assert (exported["default_sampler"], exported["default_steps"]) == ("lcm", 4)
    assert exported["default_guidance_scale"] == 1.0
    student = ld.load(str(tmp_path / "straight/export"))
    (image,) = student.generate("a red circle", seed=0, width=32, height=32)  # the LCM sampler, 4 steps
    assert image.size == (32, 32)


def test_lcm_lora_from_the_command_line_records_and_resumes_its_options(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["finetune", "--lcm", "--lcm-guidance", "2.5", "--model", str(tiny), "--lora", "4"]
    assert main([*args, "--max_steps=2", "-o", str(run), *FAST]) == 0
    assert "LoRA saved to" in capsys.readouterr().out
    record = json.loads((run / "finetune.json").read_text())
    assert record["consistency"] == {"guidance": 2.5, "huber_c": 0.001, "objective": "consistency"}
    assert record["lora"]["rank"] == 4
    assert json.loads((run / "config.json").read_text())["data"]["caption_dropout"] == 0.0
    assert main(["finetune", "-o", str(run), "--resume", "--max_steps=3", "--quiet"]) == 0
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    assert main(["finetune", "-o", str(run), "--resume", "--lcm-guidance", "4", "--max_steps=4"]) == 2
    assert "different fine-tuning options" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lcm-guidance", "2"], "--lcm-guidance belongs to --lcm"),
        (["--lcm", "--lcm-guidance", "0.5"], "guidance scale must be >= 1"),
        (["--lcm", "--lcm-huber", "0"], "pseudo-Huber constant must be > 0"),
        (["--lcm-objective", "guidance"], "--lcm-objective belongs to --lcm"),
    ],
)
def test_bad_distillation_options_are_one_clear_line(tiny, tmp_path, args, message, capsys):
    code = main(["finetune", "--model", str(tiny), *args, "--max_steps=1", "-o", str(tmp_path / "r"), *FAST])
    assert code == 2
    error = capsys.readouterr().err
    assert message in error and "Traceback" not in error


def test_flow_models_are_refused():
    components = ld.load("preset:tiny").components
    schedule = replace(components.config.schedule, process="flow", prediction_type="flow")
    flow = replace(components, config=replace(components.config, schedule=schedule))
    with pytest.raises(UserError, match="discrete training schedule"):
        task_for(flow)


@pytest.mark.parametrize("setting", ["pixel_weight", "input_perturbation"])
def test_the_denoising_loss_settings_are_refused_not_ignored(setting):
    components = ld.load("preset:tiny").components
    overrides = {"data.resolution": 32, f"diffusion.{setting}": 1}
    config = finetune_config("tiny", components.config, lora=False, overrides=overrides)
    with pytest.raises(UserError, match=rf"drop diffusion\.{setting}"):
        ConsistencyDistillationTask(config, components, CPU, ConsistencyOptions())


def test_a_shipped_variant_is_its_model_with_the_lora_merged_and_the_lcm_defaults(
    tiny, tmp_path, monkeypatch
):
    from latentdiffusion.pipelines import loading

    shipped = tmp_path / "data"
    (shipped / "default").mkdir(parents=True)
    for file in tiny.iterdir():
        (shipped / "default" / file.name).write_bytes(file.read_bytes())
    monkeypatch.setattr(loading, "shipped_model_dir", lambda name: shipped / name)
    with pytest.raises(UserError, match="LoRA is not installed"):
        ld.load("default-few-step")
    run = tmp_path / "run"
    args = ["finetune", "--lcm", "--model", str(tiny), "--lora", "4", "--optim.lr=1e-2", "--max_steps=2"]
    assert main([*args, "-o", str(run), *FAST]) == 0
    (shipped / "default" / "few-step-lora.safetensors").write_bytes(
        (run / "export/lora.safetensors").read_bytes()
    )
    variant = ld.load("default-few-step")
    config = variant.components.config
    assert (config.default_sampler, config.default_steps, config.default_guidance_scale) == ("lcm", 4, 1.0)
    assert variant.components.name == "default-few-step"
    merged = ld.load(str(tiny), loras=[(run / "export/lora.safetensors", 1.0)]).components.network
    base = ld.load(str(tiny)).components.network.state_dict()
    for name, tensor in variant.components.network.state_dict().items():
        torch.testing.assert_close(tensor, merged.state_dict()[name])
    assert any(not torch.equal(t, base[n]) for n, t in variant.components.network.state_dict().items())
