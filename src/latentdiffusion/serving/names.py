"""Sampler names as clients send them, mapped to ours.

AUTOMATIC1111 clients name a sampler by its display name, older ones with the discretisation appended
("DPM++ 2M Karras"), newer ones with a separate ``scheduler`` field ("karras"), and scripts by its
k-diffusion alias ("k_euler_a"). All of these, and our own names (``samplers.SAMPLERS``), are accepted
(case-insensitively); the table is in docs/serving.md.
"""

from __future__ import annotations

from latentdiffusion.pipelines.metadata import SAMPLER_DISPLAY_NAMES, SIGMAS_DISPLAY_NAMES
from latentdiffusion.samplers import SAMPLERS
from latentdiffusion.serving.settings import FieldError

# The web UI's k-diffusion aliases (its /sdapi/v1/samplers "aliases") for the samplers we have.
ALIASES = {
    "ddim": ("ddim",),
    "ddpm": ("ddpm",),
    "plms": ("plms",),
    "euler": ("k_euler",),
    "euler_ancestral": ("k_euler_a", "k_euler_ancestral"),
    "heun": ("k_heun",),
    "lms": ("k_lms",),
    "dpmpp_2m": ("k_dpmpp_2m",),
    "dpmpp_2m_sde": ("k_dpmpp_2m_sde",),
    "unipc": ("unipc",),
    "lcm": ("k_lcm",),
}
# The web UI's ``scheduler`` values; "automatic" is the sampler's (for us, the model's) own spacing.
SCHEDULERS = {"automatic": None, "karras": "karras", "exponential": "exponential"}


def _lookup_table() -> dict[str, tuple[str, str | None]]:
    """Every accepted spelling, lower case -> (our sampler, discretisation or None)."""
    table: dict[str, tuple[str, str | None]] = {}
    for sampler in SAMPLERS:
        spellings = (sampler, SAMPLER_DISPLAY_NAMES.get(sampler, sampler), *ALIASES.get(sampler, ()))
        for spelling in spellings:
            table[spelling.lower()] = (sampler, None)
            for sigmas, suffix in SIGMAS_DISPLAY_NAMES.items():
                table[f"{spelling} {suffix}".lower()] = (sampler, sigmas)
        for alias in ALIASES.get(sampler, ()):
            table[f"{alias}_ka"] = (sampler, "karras")  # the web UI's old "k_lms_ka" style
    return table


_TABLE = _lookup_table()


def resolve_sampler(
    name: str | None, scheduler: str | None = None, field: str = "sampler_name", default: str = "dpmpp_2m"
) -> tuple[str, str | None]:
    """A client's sampler (and scheduler) -> (our sampler name, sigmas discretisation or None)."""
    sampler, sigmas = (default, None) if not name else _TABLE.get(name.strip().lower(), (None, None))
    if sampler is None:
        known = ", ".join(display_names())
        raise FieldError(field, f"unknown sampler {name!r}; known: {known} (or ours: {', '.join(SAMPLERS)})")
    if scheduler and scheduler.strip().lower() != "automatic":
        key = scheduler.strip().lower()
        if key not in SCHEDULERS:
            raise FieldError("scheduler", f"unknown scheduler {scheduler!r}; known: {', '.join(SCHEDULERS)}")
        sigmas = SCHEDULERS[key]
    return sampler, sigmas


def display_names() -> list[str]:
    """The web UI's names of our samplers, in ``SAMPLERS`` order."""
    return [SAMPLER_DISPLAY_NAMES.get(name, name) for name in SAMPLERS]
