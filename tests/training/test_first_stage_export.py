import pytest
import torch
from safetensors.torch import load_file

from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.errors import UserError
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.autoencoder import install_decoder, reconstruction_loss, save_first_stage
from latentdiffusion.training.config import AutoencoderLossConfig, apply_overrides
from latentdiffusion.training.loop import train
from latentdiffusion.training.presets import get_train_preset


def test_save_first_stage_keeps_the_autoencoder_and_shrinks_the_rest(tmp_path):
    save_native(build_components(TINY, seed=3, name="tiny-ae"), tmp_path / "run")
    save_first_stage(str(tmp_path / "run"), tmp_path / "ae", dtype=None)
    original, small = load_components(str(tmp_path / "run")), load_components(str(tmp_path / "ae"))
    theirs, ours = original.autoencoder.state_dict(), small.autoencoder.state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)
    assert small.config.autoencoder == original.config.autoencoder and small.name == "tiny-ae"
    placeholders = sum(
        p.numel() for role in ("unet", "text_encoder") for p in small.modules[role].parameters()
    )
    assert placeholders < 0.5e6
    save_first_stage(str(tmp_path / "run"), tmp_path / "ae16")  # fp16 by default
    stored = load_file(tmp_path / "ae16" / "model.safetensors")
    assert {v.dtype for k, v in stored.items() if k.startswith("autoencoder.")} == {torch.float16}


def test_reconstruction_loss_adds_the_configured_terms():
    x, y = torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4)
    y[..., 1, 1] = 0.4  # one pixel off by 0.4 in every channel, on a flat target (no edges: weight 1)
    l1, mse = 0.4 / 16, 0.16 / 16
    gradient = 2 * (2 * 0.4 / 12)  # per direction: two of its 12 differences are 0.4
    assert reconstruction_loss(x, y, AutoencoderLossConfig()).item() == torch.tensor(l1).item()
    both = AutoencoderLossConfig(gradient_weight=2.0, mse_weight=3.0, edge_weight=5.0)
    expected = l1 + 2.0 * gradient + 3.0 * mse
    assert abs(reconstruction_loss(x, y, both).item() - expected) < 1e-6


def test_remap_colours_maps_each_chosen_image_by_one_affine_map_per_channel_within_range():
    from latentdiffusion.training.autoencoder import remap_colours
    from latentdiffusion.training.task import StepRandom

    torch.manual_seed(0)
    palette = torch.rand(3, 3) * 2 - 1  # three flat colours in two-colour images
    x = palette[torch.randint(3, (64, 1, 8, 8))].permute(0, 4, 2, 3, 1)[..., 0]  # [64, 3, 8, 8]
    x[:, :, 0, 0], x[:, :, 0, 1] = -1.0, 1.0  # each channel's extremes, so the range check bites
    y = remap_colours(x, StepRandom(5, 0, 64, torch.arange(64)), share=0.5)
    assert y.min() >= -1 and y.max() <= 1
    changed = (y != x).flatten(1).any(dim=1)
    assert 16 < changed.sum() < 48  # about half the images
    for i in torch.nonzero(changed).flatten():  # per channel: y = a x + b with one (a, b) per image
        for c in range(3):
            xs, ys = x[i, c].flatten(), y[i, c].flatten()
            a = (ys[1] - ys[0]) / (xs[1] - xs[0])
            assert torch.allclose(ys, a * xs + (ys[0] - a * xs[0]), atol=1e-6)
    again = remap_colours(x, StepRandom(5, 0, 64, torch.arange(64)), share=0.5)
    assert torch.equal(y, again)  # drawn from the step's seeded stream: resumable
    assert torch.equal(remap_colours(x, StepRandom(5, 0, 64, torch.arange(64)), share=0.0), x)


def test_a_decoder_only_run_keeps_the_encoder_and_the_latent_scale(tmp_path):
    """autoencoder_loss.train_encoder=false: the export's latents are --init's to the bit (encoder, quant
    convolution, scale), so every model trained on them takes its decoder; the decoder side trained."""
    start = build_components(TINY, seed=3, name="tiny-ae")
    save_native(start, tmp_path / "start")
    overrides = {"sample.prompts": "", "data.holdout": 2, "max_steps": 3, "optim.lr": 1e-2}
    overrides |= {"autoencoder_loss.disc_start": 10**6, "autoencoder_loss.train_encoder": False}
    config = apply_overrides(get_train_preset("tiny-autoencoder"), overrides)
    with pytest.raises(UserError, match="train_encoder=false trains a decoder for an existing encoder"):
        train(config, tmp_path / "no-init")
    result = train(apply_overrides(config, {"init": str(tmp_path / "start")}), tmp_path / "run")
    before = load_components(str(tmp_path / "start"))
    after = load_components(str(result.export_dir))
    assert after.config.autoencoder == before.config.autoencoder  # the scale too
    old, new = before.autoencoder.state_dict(), after.autoencoder.state_dict()
    kept = {k for k in old if torch.equal(old[k], new[k])}
    assert kept == {k for k in old if k.startswith(("encoder.", "quant_conv."))}
    assert any(k.startswith("decoder.") for k in old) and "post_quant_conv.weight" not in kept


def test_install_decoder_puts_a_decoder_only_export_into_a_model_and_its_refiner(tmp_path):
    base, refiner = build_components(TINY, seed=3, name="m"), build_components(TINY, seed=4, name="r")
    refiner.autoencoder.load_state_dict(base.autoencoder.state_dict())
    save_native(base, tmp_path / "model", dtype=torch.float16, refiner=(refiner, 0.5))
    trained = load_components(str(tmp_path / "model"))  # fp16 weights read as float32
    with torch.no_grad():
        for p in trained.autoencoder.decoder.parameters():
            p.add_(0.25)
    save_native(trained, tmp_path / "new-decoder")
    stranger = build_components(TINY, seed=9, name="s")  # another encoder: other latents
    save_native(stranger, tmp_path / "stranger")
    before = {
        f: load_file(tmp_path / f) for f in ("model/model.safetensors", "model/refiner/model.safetensors")
    }
    with pytest.raises(UserError, match="encodes differently"):
        install_decoder(str(tmp_path / "stranger"), tmp_path / "model")
    assert all(torch.equal(load_file(tmp_path / f)[k], v) for f, s in before.items() for k, v in s.items())

    written = install_decoder(str(tmp_path / "new-decoder"), tmp_path / "model")
    assert len(written) == 2
    wanted = {f"autoencoder.{k}": v for k, v in trained.autoencoder.state_dict().items()}
    for f, old in before.items():
        new = load_file(tmp_path / f)
        assert new.keys() == old.keys()
        for key, value in new.items():
            assert value.dtype == old[key].dtype
            if key.startswith("autoencoder.decoder."):
                assert torch.equal(value, wanted[key].half()) and not torch.equal(value, old[key])
            else:
                assert torch.equal(value, old[key]), key
