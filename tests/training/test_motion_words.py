"""Motion training that also learns prompt words (textual inversion of the motion vocabulary): only the
word vectors and the modules get gradients, resume is exact, the export writes one embedding file per word
beside the module, ``animate`` with that module uses them (and only it: still images are unchanged), and
bad word options are refused."""

from __future__ import annotations

import pytest
import torch

import latentdiffusion as ld
from latentdiffusion.checkpoints.motion_keys import load_motion_modules, save_motion_modules
from latentdiffusion.embeddings import read_parts, save_embedding
from latentdiffusion.errors import UserError
from latentdiffusion.models.motion import MotionModules
from latentdiffusion.pipelines.animate import motion_words_dir, words_folder
from latentdiffusion.pipelines.loading import load_components
from latentdiffusion.training.motion import (
    EXPORT_FILE,
    MOVING_SHAPES_WORDS,
    MotionOptions,
    MotionTask,
    train_motion,
)
from latentdiffusion.training.task import StepRandom

from .test_motion_training import base, clip_batch, config_for, straight_and_resumed  # noqa: F401  (the tiny base model)

WORDS = MotionOptions(frames=4, words=MOVING_SHAPES_WORDS, words_lr=1e-2)
CLIP = {"frames": 2, "steps": 2, "seed": 3, "guidance_scale": 3.0}


def test_gradients_reach_the_words_and_the_modules_only(base):  # noqa: F811
    task = MotionTask(config_for(base), load_components(str(base)), torch.device("cpu"), WORDS)
    groups = task.parameter_groups()
    assert set(groups) == {"motion", "words"} and task.learning_rate("words") == 1e-2
    assert task.optim_config("words").weight_decay == 0 < task.optim_config("motion").weight_decay
    start = task.words.vectors["text_encoder"].detach().clone()
    table = task.components.modules["text_encoder"].embeddings.token_embedding.weight
    first = task.tokenizers["text_encoder"].placeholder_ids("moving")[0] - table.shape[0]
    moving = task.components.tokenizers["text_encoder"].tokenize("moving")[0]
    assert torch.equal(start[first], table[moving])  # each word starts as the encoder's own embedding
    batch = clip_batch()
    losses, _ = task.losses(task.networks, batch, StepRandom(0, 0, 1, torch.arange(1)), 0)
    assert losses["motion"] is losses["words"]  # one graph: one backward pass for both groups
    losses["motion"].backward()
    grad = task.words.vectors["text_encoder"].grad
    used = task.tokenizers["text_encoder"].tokenize(batch.captions[0])
    rows = [i - table.shape[0] for i in used if i >= table.shape[0]]
    assert rows and grad[rows].abs().sum() > 0  # the caption's motion words learn
    unused = [i for i in range(len(grad)) if i not in rows]
    assert grad[unused].abs().sum() == 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["motion"])
    frozen = [*task.unet.parameters(), *task.components.modules["text_encoder"].parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)


def test_resume_exact_and_export_beside_the_module(base, tmp_path, interrupt_after):  # noqa: F811
    config = config_for(base, max_steps="2")
    straight, resumed = straight_and_resumed(config, tmp_path, WORDS, interrupt_after)
    module = straight.export_dir / EXPORT_FILE
    folder = motion_words_dir(module)
    assert folder == words_folder(module) and folder is not None
    assert sorted(p.stem for p in folder.iterdir()) == sorted(MOVING_SHAPES_WORDS)
    other_folder = motion_words_dir(resumed.export_dir / EXPORT_FILE)
    for word in MOVING_SHAPES_WORDS:
        key, ours = _block(folder / f"{word}.safetensors")
        assert key == "emb_params" and torch.equal(ours, _block(other_folder / f"{word}.safetensors")[1])
    start = load_components(str(base))
    moving = start.modules["text_encoder"].embeddings.token_embedding.weight[
        start.tokenizers["text_encoder"].tokenize("moving")
    ]
    assert not torch.equal(_block(folder / "moving.safetensors")[1], moving)  # it learned
    a = load_motion_modules(module).state_dict()
    b = load_motion_modules(resumed.export_dir / EXPORT_FILE).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = MotionOptions(frames=4, words=("up",))
    with pytest.raises(UserError, match=r"cannot resume .* different motion options"):
        train_motion(config, tmp_path / "straight", other, resume=True)


@pytest.fixture(scope="module")
def module_with_words(base, tmp_path_factory):  # noqa: F811
    """A motion module file for the tiny model and, beside it, a learned "moving" far from the original."""
    folder = tmp_path_factory.mktemp("module")
    model = load_components(str(base)).config
    torch.manual_seed(0)
    modules = MotionModules(MotionOptions(frames=4).motion_config(model)).eval()
    save_motion_modules(modules, folder / "motion.safetensors")
    width = load_components(str(base)).modules["text_encoder"].config.hidden_size
    save_embedding(
        folder / "motion.embeddings" / "moving.safetensors", {"te": torch.randn(1, width) * 3}, "moving", 1
    )
    return folder / "motion.safetensors"


def test_animate_uses_the_words_beside_the_module_and_stills_stay(base, module_with_words):  # noqa: F811
    pipe = ld.load(str(base))
    prompt = "a red square moving left on a blue background"
    still = pipe.generate(prompt, steps=2, seed=1)[0]
    clip = pipe.animate(prompt, motion_module=module_with_words, **CLIP)
    modules = load_motion_modules(module_with_words)
    plain = pipe.animate(prompt, motion_module=modules, **CLIP)  # loaded modules: no words beside them
    assert any(not _same(a, b) for a, b in zip(clip, plain, strict=True))
    assert _same(pipe.generate(prompt, steps=2, seed=1)[0], still)  # the words stay with the clip
    explicit = ld.load(str(base))
    explicit.load_embeddings(motion_words_dir(module_with_words))
    loaded = explicit.animate(prompt, motion_module=modules, **CLIP)
    assert all(_same(a, b) for a, b in zip(clip, loaded, strict=True))
    named = pipe.animate(
        prompt, motion_module=modules, motion_words=motion_words_dir(module_with_words), **CLIP
    )
    assert all(_same(a, b) for a, b in zip(clip, named, strict=True))


def _block(path):
    """The (key, vectors) of a one-part embedding file."""
    return read_parts(path)[0][0]


def _same(a, b) -> bool:
    import numpy as np

    return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    ("words", "lr", "message"),
    [
        (("up down",), 5e-3, "single words without spaces"),
        (("up", "up"), 5e-3, "names a word twice"),
        (("up",), 0.0, "--words-lr must be > 0"),
        (("",), 5e-3, "single words without spaces"),
    ],
)
def test_bad_word_options(base, tmp_path, words, lr, message):  # noqa: F811
    options = MotionOptions(frames=4, words=words, words_lr=lr)
    with pytest.raises(UserError, match=message):
        train_motion(config_for(base, max_steps="1"), tmp_path / "run", options)


def test_cli_words_default_vocabulary_and_bad_option(base, tmp_path, capsys):  # noqa: F811
    import json

    from latentdiffusion.cli.main import main

    run = tmp_path / "run"
    flags = ["--frames", "3", "--data.holdout=1", "--batch_size=1", "--quiet", "--max_steps=1"]
    assert main(["train-motion", "--model", str(base), "-o", str(run), "--words", *flags]) == 0
    assert tuple(json.loads((run / "motion.json").read_text())["words"]) == MOVING_SHAPES_WORDS
    assert motion_words_dir(run / "export" / EXPORT_FILE) is not None
    bad = ["train-motion", "--model", str(base), "-o", str(tmp_path / "b"), "--words", "up", "up", *flags]
    assert main(bad) == 2
    assert "names a word twice" in capsys.readouterr().err
