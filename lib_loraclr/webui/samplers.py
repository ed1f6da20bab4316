"""Which of the host's samplers CLoRA runs on, named as the host names them.

A1111 1.9+ separates samplers from schedule types ("DPM++ 2M" + "Karras", ``p.scheduler``) and
rewrites 1.8's combined names ("DPM++ 2M Karras", "LMS Karras") before any script hook runs; 1.8.0
still passes the combined names. Both arrive here: a combined name is split into the sampler and
its schedule, so messages and help speak of samplers and schedule types as the host does.
"""

from __future__ import annotations

from typing import Any

# Samplers whose denoiser calls CLoRA maps to steps (one call per step, or two for the
# second-order ones, see ``clora_sampling.step_of_call``); any schedule type works with them (the
# sampler only walks the sigmas the host hands it).
SUPPORTED_SAMPLERS = (
    "Euler",
    "Euler a",
    "DPM++ 2M",
    "LMS",
    "DDIM",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2S a",
    "DPM++ SDE",
    "DPM++ 2M SDE",
    "DPM++ 2M SDE Heun",
    "DPM++ 3M SDE",
    "Restart",
)
# Denoiser calls per step of each supported sampler (the host's ``second_order`` flag; the last
# step to sigma 0 makes one call): for the help text and the tests
CALLS_PER_STEP = {name: 1 for name in SUPPORTED_SAMPLERS} | {
    name: 2 for name in ("Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart")
}

# 1.8's combined names: sampler + schedule type
_SCHEDULE_SUFFIXES = {" Karras": "Karras", " Exponential": "Exponential"}

REFUSAL_REASONS = {
    "DPM fast": "adapts its steps to the model (CLoRA counts steps in model calls)",
    "DPM adaptive": "adapts its steps to the model (CLoRA counts steps in model calls)",
    "PLMS": "keeps its own history of predictions",
    "UniPC": "keeps its own history of predictions",
    "DDIM CFG++": "it reads the unconditional prediction the host's own denoiser call records (last_noise_uncond), "
    "which CLoRA's denoiser call replaces",
}


def sampler_and_schedule(sampler_name: str, scheduler: str | None = None) -> tuple[str, str]:
    """``(sampler, schedule type)``: 1.9+ passes them apart (``p.scheduler``, "Automatic" when
    absent); a 1.8 combined name such as "DPM++ 2M Karras" is split."""
    for suffix, schedule in _SCHEDULE_SUFFIXES.items():
        base = sampler_name[: -len(suffix)]
        if sampler_name.endswith(suffix) and (base in SUPPORTED_SAMPLERS or base in REFUSAL_REASONS):
            return sampler_name[: -len(suffix)], schedule
    return sampler_name, scheduler or "Automatic"


def of(p: Any) -> tuple[str, str]:
    """The processing object's sampler and schedule type."""
    return sampler_and_schedule(p.sampler_name, getattr(p, "scheduler", None))


def sampler_supported(sampler_name: str) -> bool:
    return sampler_and_schedule(sampler_name)[0] in SUPPORTED_SAMPLERS


def unsupported_sampler_message(sampler_name: str) -> str:
    sampler = sampler_and_schedule(sampler_name)[0]
    reason = REFUSAL_REASONS.get(sampler)
    why = f" ({reason})" if reason else ""
    return (
        f"CLoRA: sampler {sampler!r} is not supported{why}; use one of {', '.join(SUPPORTED_SAMPLERS)} "
        "with any schedule type (or disable CLoRA composition)"
    )


def help_text() -> str:
    return (
        f"Samplers: {', '.join(SUPPORTED_SAMPLERS)}, with any schedule type (Automatic, Karras, "
        "Exponential, ...); the latent update runs once per sampler step."
    )
