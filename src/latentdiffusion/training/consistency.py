"""Latent consistency distillation (LCM, Luo et al. 2023, Alg. 1 and Eq. 9; as LoRA adapters: LCM-LoRA,
Luo et al. 2023b): a few-step student of a discrete-time (VP) model.

The student f(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t) (``samplers.consistency.boundary_scalings``,
so f(z, 0) = z) is trained to give the same output at two neighbouring points of one probability-flow
ODE trajectory of the teacher. Per item, on the skipping grid t_n = k n - 1 (n = 1 .. T / k; k = 20 for
the 50 points ``ldm generate --sampler lcm`` steps on):

    z_t   = sqrt(a_t) z0 + sqrt(1 - a_t) eps                            t = t_n, n uniform
    z_s   = DDIM step of the guided teacher from t to s = max(t - k, 0)  (x0 and eps each guided with w)
    L     = pseudo-Huber( f_student(z_t, t) - stopgrad f_student(z_s, s) ),  sqrt(d^2 + c^2) - c

The guidance scale w is fixed (``ConsistencyOptions.guidance``, by default the model's own), so the
student samples unguided (``--cfg 1``) what the teacher samples guided. The target is the student's own
output without gradient (EMA decay 0, as LCM-LoRA's training does), so a run is exactly resumable from
the loop's checkpoints. With LoRA adapters the teacher is the same network with the adapters off
(strength 0); a full student keeps a frozen copy of the starting network as its teacher.

``objective="guidance"`` trains the first stage of Meng et al. 2023 ("On distillation of guided diffusion
models", Sec. 4.1) instead: the student's one conditional pass regresses the guided teacher's prediction
(both passes combined with w) at the grid's timesteps, L = || v_student(z_t, t) - v_teacher^w(z_t, t) ||^2
in the network's own output space. The student then needs as many steps as the teacher but half the
evaluations (no unconditional pass), and its targets are fixed, so training is a plain regression.

The run is ``ldm finetune --lcm`` (``training.finetune``): data, LoRA or full weights, export and resume
are the fine-tuning run's; this module adds the task.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from latentdiffusion.components import Components
from latentdiffusion.diffusion.parameterization import append_dims
from latentdiffusion.errors import UserError
from latentdiffusion.models.lora import frozen_original, original_network
from latentdiffusion.samplers.consistency import LCM_DEFAULTS, boundary_scalings
from latentdiffusion.training.config import TrainConfig
from latentdiffusion.training.data import Batch
from latentdiffusion.training.diffusion import DiffusionTask
from latentdiffusion.training.losses import vp_x0_eps
from latentdiffusion.training.task import StepRandom

ORIGINAL_STEPS = 50  # points of the distillation grid, as the LCM sampler's (schedules.lcm_timesteps)
HUBER_C = 0.001  # the pseudo-Huber constant of LCM's training


OBJECTIVES = ("consistency", "guidance")


@dataclass(frozen=True)
class ConsistencyOptions:
    """The objective (``OBJECTIVES``), the teacher's guidance scale w (None: the model's default guidance
    scale) and the consistency loss's pseudo-Huber c."""

    guidance: float | None = None
    huber_c: float = HUBER_C
    objective: str = "consistency"

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(
                f"unknown distillation objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}"
            )
        if self.guidance is not None and not self.guidance >= 1.0:
            raise UserError(f"the teacher's guidance scale must be >= 1, got {self.guidance}")
        if not self.huber_c > 0:
            raise UserError(f"the pseudo-Huber constant must be > 0, got {self.huber_c}")


def distillation_grid(num_train_timesteps: int) -> torch.Tensor:
    """The timesteps t_n = k n - 1, n = 1 .. 50 (k = T / 50) that the student learns and samples on."""
    k = num_train_timesteps // ORIGINAL_STEPS
    return torch.arange(1, ORIGINAL_STEPS + 1) * k - 1


def pseudo_huber(difference: torch.Tensor, c: float) -> torch.Tensor:
    """sqrt(d^2 + c^2) - c per element (Song & Dhariwal 2023): L2 near 0, L1 far from it."""
    return (difference.pow(2) + c * c).sqrt() - c


class ConsistencyDistillationTask(DiffusionTask):
    """The LCM objective on the loop's batches; the network being trained is the student."""

    name = "consistency"
    uses_denoising_loss = False

    def __init__(
        self,
        config: TrainConfig,
        components: Components,
        device: torch.device,
        options: ConsistencyOptions,
    ) -> None:
        super().__init__(config, components, device)
        if config.model.schedule.process != "discrete":
            raise UserError(
                "consistency distillation steps on a discrete training schedule; "
                f"{components.name!r} is a {config.model.schedule.process} model"
            )
        if config.diffusion.train_text_encoder:
            raise UserError("consistency distillation keeps the text encoder frozen: drop train_text_encoder")
        self.options = options
        self.guidance = options.guidance or config.model.default_guidance_scale
        self.grid = distillation_grid(self.process.num_train_timesteps).to(device)
        self.skip = self.process.num_train_timesteps // ORIGINAL_STEPS
        # a full student needs its own teacher; LoRA students have one in the adapter-free network
        self.teacher = frozen_original(self.network)

    def losses(
        self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom, step: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        loss = self.loss(modules[self.network_role], batch, random).mean()
        return {"model": loss}, {"loss": loss.item()}

    def loss(self, student: nn.Module, batch: Batch, random: StepRandom) -> torch.Tensor:
        """The objective's loss of each item [n]."""
        if self.options.objective == "guidance":
            return self.guidance_loss(student, batch, random)
        return self.distillation_loss(student, batch, random)

    def grid_sample(self, batch: Batch, random: StepRandom):
        """(z_t, t, cond): the batch noised to timesteps drawn from the grid, and its (frozen) condition."""
        z0 = self.latents(batch, random)
        t = self.grid[random.randint(len(self.grid), device=self.device)]
        z_t = self.process.add_noise(z0, random.randn(*z0.shape[1:], device=self.device), t)
        return z_t, t, self.condition(self.networks, batch)

    def guidance_loss(self, student: nn.Module, batch: Batch, random: StepRandom) -> torch.Tensor:
        """|| student(z_t, t, c) - guided teacher(z_t, t, c) ||^2 per item, t on the grid."""
        z_t, t, cond = self.grid_sample(batch, random)
        with torch.no_grad():
            target = self.guided_prediction(z_t, t, cond, batch)
        prediction = student(z_t, self.process.network_timestep(t), **cond).float()
        return (prediction - target).pow(2).mean(dim=(1, 2, 3))

    def guided_prediction(self, z_t: torch.Tensor, t: torch.Tensor, cond, batch: Batch) -> torch.Tensor:
        """The teacher's output with classifier-free guidance w: u + w (c - u), both passes in one batch."""
        uncond = self.family.training_condition(
            self.components, [""] * len(batch), self.condition_requests(batch)
        )
        pair = {key: torch.cat([uncond[key], cond[key]]) for key in cond}
        with self.teacher_network() as teacher:
            both = teacher(torch.cat([z_t, z_t]), self.process.network_timestep(torch.cat([t, t])), **pair)
        unconditional, conditional = both.float().chunk(2)
        return unconditional + self.guidance * (conditional - unconditional)

    def distillation_loss(self, student: nn.Module, batch: Batch, random: StepRandom) -> torch.Tensor:
        """The pseudo-Huber consistency loss of each item [n]."""
        z_t, t, cond = self.grid_sample(batch, random)
        s = (t - self.skip).clamp(min=0)
        with torch.no_grad():
            z_s = self.teacher_step(z_t, t, s, cond, batch)
            target = self.consistency(self.network, z_s, s, cond)
        prediction = self.consistency(student, z_t, t, cond)
        return pseudo_huber(prediction.float() - target.float(), self.options.huber_c).mean(dim=(1, 2, 3))

    def consistency(self, network: nn.Module, z: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """f(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t)."""
        x0, _ = self.x0_eps(network, z, t, cond)
        c_skip, c_out = boundary_scalings(append_dims(t.float(), z))
        return c_skip * z + c_out * x0

    def x0_eps(self, network: nn.Module, z: torch.Tensor, t: torch.Tensor, cond):
        prediction = network(z, self.process.network_timestep(t), **cond).float()
        alpha_bar = append_dims(self.process.alphas_cumprod(t), z)
        return vp_x0_eps(self.config.model.schedule.prediction_type, z.float(), prediction, alpha_bar)

    def teacher_step(self, z_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond, batch: Batch):
        """One DDIM step (Song et al. 2021, Eq. 12, eta 0) of the guided teacher from t to s; x0 and eps
        are linear in the prediction, so guiding the prediction guides both."""
        prediction = self.guided_prediction(z_t, t, cond, batch)
        alpha_bar_t = append_dims(self.process.alphas_cumprod(t), z_t)
        prediction_type = self.config.model.schedule.prediction_type
        x0, eps = vp_x0_eps(prediction_type, z_t.float(), prediction, alpha_bar_t)
        alpha_bar = append_dims(self.process.alphas_cumprod(s), z_t)
        return (alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * eps).to(z_t.dtype)

    def teacher_network(self):
        """The teacher: the frozen copy, or the student with its adapters switched off."""
        return original_network(self.network, self.teacher)

    def components_for_sampling(self) -> Components:
        """The student, which samples with the LCM sampler, unguided, in 4 steps by default."""
        components = super().components_for_sampling()
        return replace(components, config=replace(components.config, **LCM_DEFAULTS))

    def held_out_loss(self, modules: dict[str, nn.Module], batch: Batch, random: StepRandom) -> torch.Tensor:
        """Held-out distillation loss (``DiffusionTask.evaluate``: fixed noise and timesteps)."""
        return self.loss(modules[self.network_role], batch, random).mean()
