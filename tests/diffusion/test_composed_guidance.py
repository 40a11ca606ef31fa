"""ComposedGuidance: the composable-diffusion formula, the step each call belongs to, and plain
classifier-free guidance reproduced bit for bit by one part of weight 1."""

import pytest
import torch

from latentdiffusion.diffusion.guidance import ClassifierFreeGuidance, ComposedGuidance, StepConditions
from latentdiffusion.errors import UserError
from latentdiffusion.samplers import sample

SIGMAS = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.0])


class RecordingDenoiser:
    """x0 = 0.5 x + (the row's context value): each row's output names the conditioning it saw."""

    prediction_type = "epsilon"

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, context, concat=None, skip_layers=None):
        self.calls.append((float(sigma.max()), context[:, 0, 0].tolist()))
        extra = 0 if concat is None else concat.mean(dim=(1, 2, 3))
        return 0.5 * x + (context[:, 0, 0] + extra).view(-1, 1, 1, 1)


def ctx(*values):
    return {"context": torch.tensor(values, dtype=torch.float32).view(-1, 1, 1).expand(-1, 3, 2).clone()}


def constant(step_conditions):
    return lambda step: step_conditions


def test_composed_guidance_is_the_composable_diffusion_formula():
    # image 0: parts 1.0 (w 1.2) and 2.0 (w 0.8); image 1: part 3.0 (w -0.5)
    conditions = StepConditions(ctx(10.0, 20.0), ctx(1.0, 2.0, 3.0), (0, 0, 1), (1.2, 0.8, -0.5))
    denoiser = RecordingDenoiser()
    guided = ComposedGuidance(denoiser, constant(conditions), 7.0).for_run(SIGMAS)
    x = torch.randn(2, 4, 3, 3)
    out = guided(x, torch.tensor(5.0))
    uncond = 0.5 * x + torch.tensor([10.0, 20.0]).view(-1, 1, 1, 1)
    cond = [0.5 * x[i] + v for i, v in ((0, 1.0), (0, 2.0), (1, 3.0))]
    expected = uncond.clone()
    expected[0] += 1.2 * 7 * (cond[0] - uncond[0]) + 0.8 * 7 * (cond[1] - uncond[0])
    expected[1] += -0.5 * 7 * (cond[2] - uncond[1])
    torch.testing.assert_close(out, expected)
    assert len(denoiser.calls) == 1 and denoiser.calls[0][1] == [10.0, 20.0, 1.0, 2.0, 3.0]  # one batch


def test_per_image_extras_follow_their_part_rows():
    conditions = StepConditions(ctx(0.0, 0.0), ctx(0.0, 0.0, 0.0), (0, 1, 1), (1.0, 0.5, 0.5))
    concat = torch.stack([torch.full((1, 3, 3), 1.0), torch.full((1, 3, 3), 2.0)])
    guided = ComposedGuidance(RecordingDenoiser(), constant(conditions), 3.0, extra_cond={"concat": concat})
    x = torch.zeros(2, 4, 3, 3)
    out = guided.for_run(SIGMAS)(x, torch.tensor(10.0))
    # each row's output is its image's concat value, so every difference cond - uncond is 0
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    ("rescale", "min_sigma", "skip"), [(0.0, 0.0, False), (0.7, 0.0, True), (0.0, 3.0, True)]
)
def test_one_part_of_weight_one_is_classifier_free_guidance_bit_for_bit(rescale, min_sigma, skip):
    from latentdiffusion.diffusion.guidance import SkipLayerGuidance

    torch.manual_seed(0)
    weights = torch.randn(4, 4)
    slg = SkipLayerGuidance(layers=(1,), start=0.0, stop=1.0).for_schedule(SIGMAS) if skip else None

    def network(x, sigma, context, concat=None, skip_layers=None):
        damp = 0.9 if skip_layers else 1.0
        return (
            torch.einsum("bchw,cd->bdhw", x, weights) * context.mean() * damp / (1 + sigma.view(-1, 1, 1, 1))
        )

    cond, uncond = {"context": torch.randn(2, 3, 5)}, {"context": torch.randn(2, 3, 5)}
    extra = {"concat": torch.randn(2, 1, 3, 3)}
    plain = ClassifierFreeGuidance(
        network, {**cond, **extra}, {**uncond, **extra}, 6.5, rescale, "epsilon", min_sigma, slg
    )
    composed = ComposedGuidance(
        network,
        constant(StepConditions(uncond, cond, (0, 1), (1.0, 1.0))),
        6.5,
        rescale,
        "epsilon",
        min_sigma,
        slg,
        extra_cond=extra,
    ).for_run(SIGMAS)
    x = torch.randn(2, 4, 3, 3)
    for sigma in (10.0, 5.0, 2.0):
        assert torch.equal(plain(x, torch.tensor(sigma)), composed(x, torch.tensor(sigma)))


def steps_seen(sampler, sigmas=SIGMAS, steps_before=0):
    seen = []

    def conditions(step):
        seen.append(step)
        return StepConditions(ctx(0.0), ctx(float(step)), (0,), (1.0,))

    guided = ComposedGuidance(RecordingDenoiser(), conditions, 2.0).for_run(sigmas, steps_before)
    sample(sampler, guided, torch.randn(1, 4, 3, 3) * sigmas[0], sigmas, generator=[torch.Generator()])
    return seen


def test_each_call_uses_the_step_its_noise_level_belongs_to():
    guided = ComposedGuidance(RecordingDenoiser(), constant(None), 2.0).for_run(SIGMAS)
    assert [guided.step_at(s) for s in (10.0, 7.0, 5.0, 4.9999999, 3.0, 2.0, 1.5, 1.0, 0.5)] == [
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        3,
        3,
    ]
    assert steps_seen("euler") == [0, 1, 2, 3]
    assert steps_seen("dpmpp_2m") == [0, 1, 2, 3]
    # Heun's correction at the next level uses the next step's conditioning; the last step's, at 0, its own
    assert steps_seen("heun") == [0, 1, 1, 2, 2, 3, 3]
    assert steps_seen("euler", steps_before=5) == [5, 6, 7, 8]  # a refiner continues the count


def test_intermediate_levels_use_their_steps_conditioning():
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.0])
    assert steps_seen("unipc", sigmas) == [0, 1, 2, 3, 4]
    guided = ComposedGuidance(RecordingDenoiser(), constant(None), 2.0).for_run(sigmas)
    midpoints = (sigmas[:-2] * sigmas[1:-1]).sqrt()  # DPM++ 2S-style midpoints in log sigma
    assert [guided.step_at(float(s)) for s in midpoints] == [0, 1, 2, 3]


def test_unplaced_guidance_and_skip_layers_with_parts_are_refused():
    conditions = StepConditions(ctx(0.0), ctx(1.0, 2.0), (0, 0), (1.0, 1.0))
    with pytest.raises(ValueError, match="for_run"):
        ComposedGuidance(RecordingDenoiser(), constant(conditions), 2.0)(torch.zeros(1, 4, 3, 3), 1.0)
    from latentdiffusion.diffusion.guidance import SkipLayerGuidance

    slg = SkipLayerGuidance(layers=(0,), start=0.0, stop=1.0).for_schedule(SIGMAS)
    guided = ComposedGuidance(RecordingDenoiser(), constant(conditions), 2.0, skip_layer_guidance=slg)
    with pytest.raises(UserError, match="AND"):
        guided.for_run(SIGMAS)(torch.zeros(1, 4, 3, 3), torch.tensor(5.0))
