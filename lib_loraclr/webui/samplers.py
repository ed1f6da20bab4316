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
    "DDIM CFG++",
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


def calls_per_step(denoiser: Any) -> int:
    """Denoiser calls per sampler step, as the host itself counts them: ``launch_sampling`` sets
    ``denoiser.steps`` (the sampler's steps) and ``denoiser.total_steps`` (the expected calls,
    ``SamplerData.total_steps``: twice the steps for the samplers flagged ``second_order``: Heun,
    DPM2, DPM2 a, DPM++ 2S a, DPM++ SDE, Restart), identically on 1.8.0 and 1.10.1."""
    steps, total = getattr(denoiser, "steps", None), getattr(denoiser, "total_steps", None)
    if not steps or not total:
        return 1
    return max(1, round(int(total) / int(steps)))


def step_of_call(call: int, per_step: int) -> tuple[int, bool]:
    """``(sampler step, whether this is the step's first call)`` of the ``call``-th denoiser call
    (0-based; the host's ``denoiser.step``, which ``Sampler.initialize`` resets to 0 for every
    sampling run and each call increments).

    Why the call count and not something else, on 1.8.0 and 1.10.1 alike:

    - every second-order sampler makes exactly two calls per step except its last one (to sigma
      0: an Euler step, one call), and Restart's restart segments are two-call Heun steps in the
      middle, so ``call // 2`` is the step (its own step index, as its progress shows);
    - sigmas cannot tell: Heun's second call is at ``sigmas[i + 1]``, exactly where step
      ``i + 1``'s first call is; DPM2's and DPM++ SDE's midpoints are no schedule sigma, and
      Restart walks sigmas of its own (a second Karras schedule plus restart segments);
    - the sampler's callback (``callback_state``, ``shared.state.sampling_step``) runs after a
      step's FIRST call (between Heun's two), so it cannot tell a step's second call from the
      next step's first; and CLoRA's progress writes ``sampling_step`` itself.
    """
    return call // per_step, call % per_step == 0


def uncond_skipped(
    call: int,
    total_calls: int,
    sigma: float,
    s_min_uncond: float,
    skip_early_cond: float = 0.0,
    ngms_all_steps: bool = False,
) -> dict[str, Any]:
    """The infotext entries the host writes when its ``CFGDenoiser.forward`` skips the
    unconditional half of denoiser call ``call`` (then it guides with scale 1: the prompt
    prediction alone), or ``{}``.

    1.10's "Skip Early CFG" (``opts.skip_early_cond``: calls up to that share of the expected
    calls); NGMS, "negative guidance minimum sigma" (``p.s_min_uncond``, on 1.8.0 and 1.10.1):
    every other call (``call % 2``, every call with 1.10's ``opts.s_min_uncond_all``) whose
    ``sigma`` (the call's first, as the host passes it: timesteps for DDIM) is below it. 1.8.0
    has neither option: the defaults (0, False) give its rule."""
    if skip_early_cond and total_calls and call / total_calls <= skip_early_cond:
        return {"Skip Early CFG": skip_early_cond}
    if (call % 2 or ngms_all_steps) and s_min_uncond and s_min_uncond > 0 and sigma < s_min_uncond:
        return {"NGMS": s_min_uncond, **({"NGMS all steps": True} if ngms_all_steps else {})}
    return {}
