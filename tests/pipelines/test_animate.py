"""AnimateDiff text-to-video: parity with diffusers' AnimateDiffPipeline (motion modules from a MotionAdapter
folder and from an original-layout file), sliding context windows, seeds and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from latentdiffusion.checkpoints.motion_keys import from_diffusers, save_motion_modules, to_original
from latentdiffusion.checkpoints.safe_io import save_safetensors
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import MotionConfig, MotionModules, TemporalTransformer
from latentdiffusion.pipelines.animate import MotionLoRA, load_motion
from latentdiffusion.pipelines.pipeline import Pipeline

from .conftest import SIZE, ddim_scheduler, randomise

FRAMES = 4


def tiny_adapter(mid_block: bool = True, max_frames: int = 32):
    """A diffusers MotionAdapter for the tiny U-Net (levels 32, 64; one ResBlock each) with every weight
    random, the zero-initialised proj_out included (else the motion modules would be the identity)."""
    from diffusers import MotionAdapter

    adapter = MotionAdapter(
        block_out_channels=(32, 64),
        motion_layers_per_block=1,
        motion_norm_num_groups=32,
        motion_num_attention_heads=8,
        use_motion_mid_block=mid_block,
        motion_max_seq_length=max_frames,
    )
    randomise(adapter, 7)
    with torch.no_grad():  # keep the residual branch small, as trained modules do
        for name, parameter in adapter.named_parameters():
            if name.endswith("proj_out.weight"):
                parameter.mul_(0.5)
    return adapter.eval()


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("motion-adapter")
    adapter = tiny_adapter()
    adapter.save_pretrained(folder)
    return adapter, folder


@pytest.fixture(scope="module")
def pipelines(tiny_model, adapter_folder):
    from diffusers import AnimateDiffPipeline

    model = tiny_model("sd")
    theirs = AnimateDiffPipeline(
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        unet=model.unet,
        motion_adapter=adapter_folder[0],
        scheduler=ddim_scheduler(model.ours.config),
    )
    theirs.set_progress_bar_config(disable=True)
    return Pipeline(model.ours), theirs


SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler"}


def diffusers_clip(theirs, sampler: str, latents: torch.Tensor) -> np.ndarray:
    import diffusers

    scheduler = getattr(diffusers, SCHEDULERS[sampler])
    theirs.scheduler = scheduler.from_config(theirs.scheduler.config, timestep_spacing="leading")
    return theirs(
        "a red circle moving right",
        negative_prompt="blurry",
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        num_inference_steps=3,
        guidance_scale=5.0,
        latents=latents.clone(),
        output_type="np",
    ).frames[0]


def our_clip(ours, sampler: str, latents: torch.Tensor, motion) -> np.ndarray:
    frames = ours.animate(
        "a red circle moving right",
        negative_prompt="blurry",
        width=SIZE,
        height=SIZE,
        motion_module=motion,
        frames=FRAMES,
        steps=3,
        guidance_scale=5.0,
        sampler=sampler,
        latents=latents,
    )
    assert len(frames) == FRAMES
    return np.stack([np.asarray(frame, dtype=np.float64) / 255 for frame in frames])


def clip_latents(seed: int = 3) -> torch.Tensor:
    return torch.randn(1, 4, FRAMES, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sampler", list(SCHEDULERS))
def test_clip_from_a_motion_adapter_folder_matches_diffusers(pipelines, adapter_folder, sampler):
    ours, theirs = pipelines
    latents = clip_latents()
    expected = diffusers_clip(theirs, sampler, latents)
    actual = our_clip(ours, sampler, latents, adapter_folder[1])
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6  # every frame within one 8-bit step
    if sampler == "ddim":  # the motion modules matter: without them (proj_out 0) the clip is another
        identity = load_motion(adapter_folder[1])
        for module in identity.modules():
            if isinstance(module, TemporalTransformer):
                module.proj_out.weight.data.zero_()
                module.proj_out.bias.data.zero_()
        assert np.abs(our_clip(ours, sampler, latents, identity) - expected).max() > 4 / 255


def write_original(adapter, path) -> None:
    original = to_original(from_diffusers(adapter.state_dict()))
    assert any(
        ".temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe" in k for k in original
    )
    if path.suffix == ".ckpt":
        torch.save(original, path)
    else:
        save_safetensors(original, path)


def test_original_layout_file_gives_the_diffusers_clip(pipelines, adapter_folder, tmp_path):
    ours, theirs = pipelines
    path = tmp_path / "mm_tiny.safetensors"
    write_original(adapter_folder[0], path)
    latents = clip_latents(5)
    expected = diffusers_clip(theirs, "ddim", latents)
    actual = our_clip(ours, "ddim", latents, path)
    assert np.abs(actual - expected).max() <= 1 / 255 + 1e-6


def test_pickled_original_file_loads_the_same_weights(adapter_folder, tmp_path):
    write_original(adapter_folder[0], tmp_path / "mm_tiny.ckpt")
    pickled = load_motion(tmp_path / "mm_tiny.ckpt").state_dict()
    folder = load_motion(adapter_folder[1]).state_dict()
    assert pickled.keys() == folder.keys()
    assert all(torch.equal(pickled[k], folder[k]) for k in folder)


def test_a_clip_depends_on_its_seed_only(pipelines, adapter_folder):
    ours, _ = pipelines
    motion = load_motion(adapter_folder[1])
    options = dict(width=SIZE, height=SIZE, motion_module=motion, frames=3, steps=2, sampler="euler")
    first = ours.animate("a square", seed=11, **options)
    again = ours.animate("a square", seed=11, **options)
    other = ours.animate("a square", seed=12, **options)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(other[0]))
    assert "Motion module: given" in first[0].info["parameters"]


def test_motion_module_of_another_family_is_refused(pipelines, tmp_path):
    from diffusers import MotionAdapter

    ours, _ = pipelines
    sdxl_like = MotionAdapter(
        block_out_channels=(32, 64, 128), motion_layers_per_block=2, motion_norm_num_groups=32
    )
    save_motion_modules(load_motion_from_state(sdxl_like), tmp_path / "mm_sdxl.safetensors")
    with pytest.raises(UserError, match="level widths"):
        ours.animate("x", width=SIZE, height=SIZE, motion_module=tmp_path / "mm_sdxl.safetensors", frames=2)


def load_motion_from_state(adapter) -> MotionModules:
    from latentdiffusion.checkpoints.motion_keys import detect_config

    state = from_diffusers(adapter.state_dict())
    modules = MotionModules(detect_config({k: tuple(v.shape) for k, v in state.items()}, "test"))
    modules.load_state_dict(state)
    return modules


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"frames": 40}, "at most 32 at once"),
        ({"frames": 0}, "frames must be"),
        ({"frames": 40, "context": 8, "overlap": 8}, "overlap must be"),
        ({"frames": 40, "context": 64}, "longer than the motion module"),
        ({"frames": 4, "num_images": 2}, "one clip per call"),
    ],
)
def test_bad_clip_settings_raise_user_errors(pipelines, adapter_folder, settings, message):
    ours, _ = pipelines
    with pytest.raises(UserError, match=message):
        ours.animate("x", width=SIZE, height=SIZE, motion_module=adapter_folder[1], steps=1, **settings)


def test_motion_lora_is_merged_into_a_copy(adapter_folder, tmp_path):
    modules = load_motion(adapter_folder[1])
    before = {k: v.clone() for k, v in modules.state_dict().items()}
    block = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0"
    generator = torch.Generator().manual_seed(2)
    lora = {
        f"{block}.processor.to_v_lora.down.weight": torch.randn(2, 64, generator=generator),
        f"{block}.processor.to_v_lora.up.weight": torch.randn(64, 2, generator=generator),
    }
    torch.save(lora, tmp_path / "v2_lora_ZoomIn.ckpt")
    merged = load_motion(modules, (MotionLoRA(tmp_path / "v2_lora_ZoomIn.ckpt", 0.5),))
    assert all(torch.equal(modules.state_dict()[k], v) for k, v in before.items())
    delta = lora[f"{block}.processor.to_v_lora.up.weight"] @ lora[f"{block}.processor.to_v_lora.down.weight"]
    key = "down_blocks.1.0.blocks.0.attn1.to_v.weight"
    assert torch.allclose(merged.state_dict()[key], before[key] + 0.5 * delta)


def test_models_of_other_families_are_refused():
    import importlib.util
    from pathlib import Path

    from latentdiffusion.components import build_components

    path = Path(__file__).parents[1] / "families" / "sdxl_fixtures.py"
    spec = importlib.util.spec_from_file_location("animate_sdxl_fixtures", path)
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    sdxl = Pipeline(build_components(fixtures.TINY_SDXL, name="tiny-sdxl"))
    unet = fixtures.TINY_SDXL.unet
    widths = tuple(unet.model_channels * m for m in unet.channel_mult)
    motion = MotionModules(MotionConfig(block_channels=widths, layers=unet.num_res_blocks))
    with pytest.raises(UserError, match="is a sdxl model: motion modules run on Stable Diffusion 1"):
        sdxl.animate("x", width=64, height=64, motion_module=motion, frames=2, steps=1)
