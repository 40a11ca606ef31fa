import math

import pytest
import torch

from latentdiffusion.training.losses import (
    PatchDiscriminator,
    adaptive_weight,
    edge_mask,
    edge_weighted_l1,
    generator_loss,
    gradient_l1,
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


def _square_image(size: int = 12) -> torch.Tensor:
    x = torch.full((1, 3, size, size), -1.0)
    x[..., 4:8, 4:8] = 1.0  # a white 4x4 square on black
    return x


def test_edge_mask_marks_both_sides_of_each_edge_and_dilates():
    mask = edge_mask(_square_image(), radius=0)[0, 0]
    # the square fills rows/columns 4..7: the pixels on both sides of its border (3 and 4, 7 and 8) count
    assert mask[5, 3] == 1 and mask[5, 4] == 1 and mask[3, 5] == 1 and mask[8, 5] == 1 and mask[9, 5] == 0
    assert mask[5, 5] == 0 and mask[0, 0] == 0 and mask[3, 3] == 0  # diagonal neighbours do not count
    dilated = edge_mask(_square_image(), radius=1)[0, 0]
    assert dilated[5, 5] == 1 and dilated[2, 5] == 1 and dilated[1, 5] == 0
    assert torch.equal(edge_mask(torch.zeros(2, 3, 5, 5), 2), torch.zeros(2, 1, 5, 5))


def test_edge_weighted_l1_weights_errors_near_edges():
    x = _square_image()
    near, far = x.clone(), x.clone()
    near[..., 4, 4] += 0.5  # an error on the square's corner pixel
    far[..., 0, 11] += 0.5  # the same error in the background, far from the edges
    assert edge_weighted_l1(x, near, 0.0, 1) == pytest.approx(edge_weighted_l1(x, far, 0.0, 1).item())
    ratio = edge_weighted_l1(x, near, 4.0, 1) / edge_weighted_l1(x, far, 4.0, 1)
    assert ratio.item() == pytest.approx(5.0)  # weight 1 + 4 on the edge, 1 elsewhere
    # normalised by the mean weight: a uniform error keeps the plain L1 value
    assert edge_weighted_l1(x, x + 0.25, 4.0, 1).item() == pytest.approx(0.25)


def test_gradient_l1_ignores_a_constant_shift_and_penalises_texture_and_blur():
    x = _square_image()
    assert gradient_l1(x, x + 0.3).item() == pytest.approx(0.0, abs=1e-7)
    textured = x.clone()
    textured[..., ::2, ::2] += 0.1  # a grid pattern over the flat fills
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    assert gradient_l1(x, textured) > 0 and gradient_l1(x, blurred) > 0
    # by hand: rows [0, 1] against rows [0, 3]: horizontal |1 - 3| = 2 on each row, vertical 0 -> 2 + 0
    a, b = torch.tensor([[[[0.0, 1.0], [0.0, 1.0]]]]), torch.tensor([[[[0.0, 3.0], [0.0, 3.0]]]])
    assert gradient_l1(a, b).item() == pytest.approx(2.0)
