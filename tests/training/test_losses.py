import math

import pytest
import torch

from latentdiffusion.training.losses import (
    PatchDiscriminator,
    adaptive_weight,
    generator_loss,
    hinge_discriminator_loss,
    min_snr_weight,
    shift_timesteps,
    snr,
)
from latentdiffusion.training.optim import WarmupCosine
from latentdiffusion.training.perceptual import LPIPS, load_perceptual_loss, vgg_feature_indices


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1] -> 0.5 * (0.25 + 0.5)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.375)
    assert generator_loss(fake).item() == pytest.approx(1.0)


def test_adaptive_weight_is_the_ratio_of_gradient_norms():
    w = torch.randn(3, 3, requires_grad=True)
    x = torch.randn(5, 3)
    rec, gan = (x @ w).abs().mean(), -(x @ w).sum() * 0.1
    expected = torch.autograd.grad(rec, w, retain_graph=True)[0].norm() / (
        torch.autograd.grad(gan, w, retain_graph=True)[0].norm() + 1e-4
    )
    assert adaptive_weight(rec, gan, w).item() == pytest.approx(expected.item(), rel=1e-6)


def test_timestep_shift_maps_the_unit_interval_towards_high_noise():
    f = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    assert torch.equal(shift_timesteps(f, 1.0), f)
    # s f / (1 + (s - 1) f) at s = 3: 0.25 -> 0.5, 0.5 -> 0.75, end points fixed
    assert shift_timesteps(f, 3.0).tolist() == pytest.approx([0.0, 0.5, 0.75, 0.9, 1.0])
    assert shift_timesteps(f, 1 / 3).tolist() == pytest.approx([0.0, 0.1, 0.25, 0.5, 1.0])


def test_min_snr_weights():
    a = torch.tensor([0.99, 0.5, 0.01, 0.0], dtype=torch.float64)  # last: zero terminal SNR
    ratio = snr(a[:3])
    eps = min_snr_weight(a, 5.0, "epsilon")
    assert eps[:3].tolist() == pytest.approx((ratio.clamp(max=5) / ratio).tolist(), rel=1e-6)
    assert eps[3].item() == 1.0
    v = min_snr_weight(a, 5.0, "v_prediction")
    assert v[:3].tolist() == pytest.approx((ratio.clamp(max=5) / (ratio + 1)).tolist(), rel=1e-6)
    assert v[3].item() == 0.0 and torch.isfinite(v).all()


def test_patch_discriminator_shape():
    d = PatchDiscriminator(3, channels=8, num_layers=3)
    assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_warmup_cosine():
    f = WarmupCosine(warmup=10, total=110, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert WarmupCosine(2, 10, 0.1, cosine=False)(8) == 1.0


def test_perceptual_loss_reads_torchvision_and_lpips_keys(tmp_path):
    from safetensors.torch import save_file

    model = LPIPS()
    state = {}
    for stage in vgg_feature_indices():
        for index in stage:
            conv = model.convs[str(index)]
            state[f"features.{index}.weight"] = torch.randn_like(conv.weight) * 0.05
            state[f"features.{index}.bias"] = torch.zeros_like(conv.bias)
    for k, head in enumerate(model.heads):
        state[f"lin{k}.model.1.weight"] = torch.rand_like(head.weight)
    save_file(state, tmp_path / "lpips.safetensors")
    loss = load_perceptual_loss(str(tmp_path / "lpips.safetensors"), torch.device("cpu"))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert loss(x, x).abs().max().item() < 1e-6
    assert (loss(x, x.flip(-1)) > 0).all()
    assert load_perceptual_loss(None, torch.device("cpu")) is None
    with pytest.raises(Exception, match="never downloaded"):
        load_perceptual_loss(str(tmp_path / "missing.pt"), torch.device("cpu"))
