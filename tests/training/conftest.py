"""Training tests run many tiny steps: one thread avoids OpenMP oversubscription on a shared 2-core CPU."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shapes_batch(n: int, resolution: int = 32):
    """The first n images of the seed-0 shapes dataset, resized, with their captions."""
    from latentdiffusion.training.data import Batch
    from latentdiffusion.training.shapes import ShapesDataset, images_to_tensor

    items = [ShapesDataset(0)[i] for i in range(n)]
    images = [image.resize((resolution, resolution)) for image, _ in items]
    return Batch(images_to_tensor(images), [caption for _, caption in items], torch.arange(n))


def _overfit(task, batch, steps: int, lr: float, make_optimizer=None) -> list[float]:
    """Adam (or ``make_optimizer(params)``) on one fixed batch with the same noise every step; the summed
    loss after each step."""
    from latentdiffusion.training.task import StepRandom

    params = [p for group in task.parameter_groups().values() for p in group]
    for p in params:
        p.requires_grad_(True)
    optimizer = make_optimizer(params) if make_optimizer else torch.optim.Adam(params, lr=lr)
    modules = task.forward_modules()
    losses = []
    for step in range(steps):
        loss = task.losses(modules, batch, StepRandom(0, 0, len(batch), batch.positions), step)[0]
        optimizer.zero_grad()
        sum(loss.values()).backward()
        optimizer.step()
        losses.append(sum(v.item() for v in loss.values()))
    return losses


@pytest.fixture
def shapes_batch():
    return _shapes_batch


@pytest.fixture
def overfit():
    return _overfit


def _interrupt_after(monkeypatch, step: int) -> None:
    """Make the training loop raise KeyboardInterrupt right after the checkpoint of ``step`` (a kill)."""
    from latentdiffusion.training.loop import Trainer

    original = Trainer.after_step

    def after_step(self, *args):
        original(self, *args)
        if self.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "after_step", after_step)


@pytest.fixture
def interrupt_after():
    return _interrupt_after
