import torch
from safetensors.torch import load_file

from latentdiffusion.checkpoints.native import save_native
from latentdiffusion.components import build_components
from latentdiffusion.config import TINY
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.autoencoder import reconstruction_loss, save_first_stage
from latentdiffusion.training.config import AutoencoderLossConfig


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
