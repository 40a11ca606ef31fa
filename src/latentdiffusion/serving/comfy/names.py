"""ComfyUI's sampler and scheduler names (``comfy/samplers.py``: ``KSAMPLER_NAMES`` + ``SAMPLER_NAMES``,
``SCHEDULER_NAMES``) mapped to our samplers (``samplers.SAMPLERS``) and noise-level discretisations
(``diffusion.schedules``). Names with no counterpart here are refused by name; docs/serving.md has the
table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latentdiffusion.diffusion.schedules import SPACINGS
from latentdiffusion.errors import UserError


@dataclass(frozen=True)
class SamplerChoice:
    """Our sampler for a ComfyUI sampler name, with the options that make it that variant."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


# ComfyUI's sampler -> ours. Its "ddim" is the deterministic DDIM update (our ddim, eta 0); the *_gpu
# variants differ from their CPU twins only in where the noise is drawn.
SAMPLERS: dict[str, SamplerChoice] = {
    "euler": SamplerChoice("euler"),
    "euler_ancestral": SamplerChoice("euler_ancestral"),
    "heun": SamplerChoice("heun"),
    "dpm_2": SamplerChoice("dpm_2"),
    "dpm_2_ancestral": SamplerChoice("dpm_2_ancestral"),
    "lms": SamplerChoice("lms"),
    "dpmpp_2m": SamplerChoice("dpmpp_2m"),
    "dpmpp_2m_sde": SamplerChoice("dpmpp_2m_sde"),
    "dpmpp_2m_sde_gpu": SamplerChoice("dpmpp_2m_sde"),
    "ddpm": SamplerChoice("ddpm"),
    "lcm": SamplerChoice("lcm"),
    "ddim": SamplerChoice("ddim", {"eta": 0.0}),
    "uni_pc": SamplerChoice("unipc", {"variant": "bh1"}),
    "uni_pc_bh2": SamplerChoice("unipc", {"variant": "bh2"}),
}

# ComfyUI's sampler names that have no counterpart here (refused with a message naming ours).
UNSUPPORTED_SAMPLERS = (
    "euler_cfg_pp",
    "euler_ancestral_cfg_pp",
    "heunpp2",
    "dpm_fast",
    "dpm_adaptive",
    "dpmpp_2s_ancestral",
    "dpmpp_2s_ancestral_cfg_pp",
    "dpmpp_sde",
    "dpmpp_sde_gpu",
    "dpmpp_2m_cfg_pp",
    "dpmpp_3m_sde",
    "dpmpp_3m_sde_gpu",
    "ipndm",
    "ipndm_v",
    "deis",
    "res_multistep",
    "res_multistep_cfg_pp",
    "res_multistep_ancestral",
    "res_multistep_ancestral_cfg_pp",
    "gradient_estimation",
    "er_sde",
    "seeds_2",
    "seeds_3",
)

# ComfyUI's scheduler -> our discretisation. On a discrete VP model every name is reproduced level for
# level from the training table (``comfy.schedulers``); on a flow model (SD3) the names with a
# counterpart here map to it ("normal" spaces timesteps evenly: our "linspace"; "simple" and
# "sgm_uniform" take every (T / steps)-th level from the top: "trailing"; "ddim_uniform" from the
# bottom: "leading"; the ramps by name) and the model keeps its own levels for the three spacings; the
# names mapped to None are refused there.
SCHEDULERS: dict[str, str | None] = {
    "normal": "linspace",
    "karras": "karras",
    "exponential": "exponential",
    "sgm_uniform": "trailing",
    "simple": "trailing",
    "ddim_uniform": "leading",
    "beta": None,
    "linear_quadratic": None,
    "kl_optimal": None,
}
UNSUPPORTED_SCHEDULERS: tuple[str, ...] = ()


def discretisation(scheduler: str, process: str) -> str | None:
    """Our discretisation for a ComfyUI scheduler name on a model whose noise process is ``process``
    (None: the model's own levels, or on a discrete model ComfyUI's table levels)."""
    kind = SCHEDULERS[scheduler]
    if process == "flow" and kind is None:
        flow_names = [name for name, value in SCHEDULERS.items() if value is not None]
        raise UserError(f"scheduler '{scheduler}' needs a discrete-timestep model; use one of {flow_names}")
    return None if process == "flow" and kind in SPACINGS else kind


def refusal(kind: str, value: str) -> str:
    """Why a ComfyUI sampler or scheduler name is not taken, naming those that are."""
    known = list(SAMPLERS if kind == "sampler_name" else SCHEDULERS)
    unsupported = UNSUPPORTED_SAMPLERS if kind == "sampler_name" else UNSUPPORTED_SCHEDULERS
    what = "sampler" if kind == "sampler_name" else "scheduler"
    if value in unsupported:
        return f"{kind}: ComfyUI's {what} '{value}' is not implemented by this server; use one of {known}"
    return f"{kind}: '{value}' not in {known}"
