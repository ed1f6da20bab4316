"""Reference samplers in k-diffusion's shape, for tests, the CLI and the demo.

Inside the WebUI the host's samplers run; outside it we need a small, exact sampling loop. Every
sampler is a plain function ``sample_x(model, x, sigmas, extra_args=None, callback=None,
disable=None)`` where ``model(x, sigma, **extra_args)`` is a *denoiser* returning the predicted clean
latent (Karras et al. 2022's D(x; sigma)), ``x`` starts at ``sigmas[0]`` noise, and ``sigmas`` ends
at the final noise level (0 for a fully denoised result). Wrap an eps-predicting SD UNet with
:class:`EpsDenoiser` (k-diffusion's ``CompVisDenoiser``) and add CFG with :class:`CFGDenoiser`.

Contract relied on by the CLoRA core (called inside the denoiser once per call): a denoiser may
update ``x`` IN PLACE before predicting; every sampler here reads ``x`` again after the call and
never keeps a copy from before it, so the step continues from the updated latent. The caller's
input tensor is cloned once at the start and never modified.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lib_loraclr.sd.cond import Cond
from lib_loraclr.sd.cond import cat as cat_conds

Denoiser = Callable[..., torch.Tensor]
StepCallback = Callable[[dict[str, Any]], None]


# -- noise schedules ------------------------------------------------------------------------------
def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(1)])


def sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: Any = "cpu"
) -> torch.Tensor:
    """Karras et al. (2022) eq. 5: ``n`` sigmas evenly spaced in ``sigma^(1/rho)``, then 0."""
    ramp = torch.linspace(0, 1, n, device=device, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero(((hi + ramp * (lo - hi)) ** rho).to(torch.float32))


def sigmas_from_alphas(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """The WebUI's default ("automatic") schedule for an SD model: ``steps`` timesteps evenly spaced
    from 999 to 0 (fractional, interpolated in log sigma, as k-diffusion's ``get_sigmas``), then 0."""
    schedule = DiscreteSchedule(alphas_cumprod)
    t = torch.linspace(len(alphas_cumprod) - 1, 0, steps, device=alphas_cumprod.device)
    return append_zero(schedule.t_to_sigma(t))


def sigmas_ddim(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """DDIM's schedule (Song et al. 2021, ldm's "uniform" discretisation): integer timesteps
    ``0, c, 2c, ... (+1)`` with ``c = T // steps``, descending, then the noise level of
    ``alphas_cumprod[0]`` where ldm's DDIM ends (not exactly 0). ``steps + 1`` values."""
    n = len(alphas_cumprod)
    ts = torch.arange(0, n, n // steps, device=alphas_cumprod.device)[:steps] + 1
    ts = ts.clamp(max=n - 1).flip(0)
    sig = DiscreteSchedule(alphas_cumprod).sigmas
    return torch.cat([sig[ts], sig[:1]])


class DiscreteSchedule:
    """Map between continuous sigma and (fractional) training timestep of a discrete schedule,
    interpolating linearly in log sigma (k-diffusion's ``DiscreteSchedule``, ``quantize=False``)."""

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        ac = alphas_cumprod.to(torch.float32)
        self.sigmas = ((1 - ac) / ac) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float32).log()
        low = (torch.searchsorted(log_sigmas, log_sigma) - 1).clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((log_sigma - lo) / (hi - lo)).clamp(0, 1)
        return low.to(torch.float32) + w

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.log_sigmas.to(t.device)
        t = t.to(torch.float32)
        low = t.floor().long().clamp(0, len(log_sigmas) - 1)
        high = t.ceil().long().clamp(0, len(log_sigmas) - 1)
        w = t - low
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


# -- denoiser wrappers ----------------------------------------------------------------------------
class EpsDenoiser:
    """An eps-predicting SD model as a denoiser D(x; sigma) (k-diffusion's ``CompVisDenoiser``).

    ``eps_fn(x_in, t, cond)`` is e.g. :meth:`lib_loraclr.sd.model.SDModel.eps`. With
    ``x = x0 + sigma * noise`` (k-diffusion's scaling of the latent), the UNet sees
    ``x / sqrt(sigma^2 + 1)`` at the timestep whose noise level is sigma, and
    ``D(x; sigma) = x - sigma * eps``.
    """

    def __init__(self, eps_fn: Callable[..., torch.Tensor], alphas_cumprod: torch.Tensor) -> None:
        self.eps_fn = eps_fn
        self.alphas_cumprod = alphas_cumprod
        self.schedule = DiscreteSchedule(alphas_cumprod)

    def get_sigmas(self, steps: int) -> torch.Tensor:
        """The default schedule for this model (:func:`sigmas_from_alphas`)."""
        return sigmas_from_alphas(self.alphas_cumprod, steps)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None, **kwargs: Any) -> torch.Tensor:
        sigma = _per_row(sigma, x)
        c_in = 1 / (sigma**2 + 1) ** 0.5
        eps = self.eps_fn(x * _bcast(c_in, x), self.schedule.sigma_to_t(sigma), cond, **kwargs)
        return x - eps * _bcast(sigma, x)


class CFGDenoiser:
    """Classifier-free guidance around a denoiser, both halves in ONE batched call:
    ``D = D(x; uncond) + scale * (D(x; cond) - D(x; uncond))`` (Ho & Salimans 2022).

    ``cond``/``uncond`` are :class:`~lib_loraclr.sd.cond.Cond` values with the batch size of ``x``.
    """

    def __init__(self, denoiser: Denoiser) -> None:
        self.denoiser = denoiser

    def __call__(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Cond,
        uncond: Cond,
        cond_scale: float = 7.0,
    ) -> torch.Tensor:
        if cond_scale == 1.0:
            return self.denoiser(x, sigma, cond=cond)
        sigma = _per_row(sigma, x)
        both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=cat_conds([cond, uncond]))
        d_cond, d_uncond = both.chunk(2)
        return d_uncond + (d_cond - d_uncond) * cond_scale


def _per_row(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _steps(n: int, disable: bool | None) -> Any:
    if disable:
        return range(n)
    try:
        from tqdm.auto import trange
    except ImportError:
        return range(n)
    return trange(n, disable=disable, leave=False)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


# -- samplers -------------------------------------------------------------------------------------
@torch.no_grad()
def sample_euler(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma``
    (Karras et al. 2022, Algorithm 2 without churn)."""
    extra_args = extra_args or {}
    x = x.clone()
    for i in _steps(len(sigmas) - 1, disable):
        sigma = sigmas[i]
        denoised = model(x, sigma * x.new_ones(x.shape[0]), **extra_args)
        d = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigma)
    return x


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0) -> tuple[Any, Any]:
    """Split a step ``sigma_from -> sigma_to`` into a deterministic step down to ``sigma_down`` and
    fresh noise of std ``sigma_up``, with ``sigma_down^2 + sigma_up^2 = sigma_to^2`` (DDPM's
    posterior variance at ``eta = 1``)."""
    if not eta:
        return sigma_to, 0.0
    up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_up = torch.minimum(sigma_to, eta * up)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler_ancestral(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Euler ancestral: an Euler step to ``sigma_down``, then noise ``sigma_up`` added back
    (k-diffusion's ``sample_euler_ancestral``; DDPM-like at ``eta = 1``)."""
    extra_args = extra_args or {}
    x = x.clone()
    for i in _steps(len(sigmas) - 1, disable):
        sigma = sigmas[i]
        denoised = model(x, sigma * x.new_ones(x.shape[0]), **extra_args)
        sigma_down, sigma_up = ancestral_step(sigma, sigmas[i + 1], eta)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        x = x + (x - denoised) / sigma * (sigma_down - sigma)
        if sigmas[i + 1] > 0:
            x = x + _noise(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): exponential integrator in ``lambda = -log
    sigma`` with a second-order multistep correction from the previous denoised estimate; first
    and last (to sigma 0) steps are first order."""
    extra_args = extra_args or {}
    x = x.clone()
    previous = None
    for i in _steps(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * x.new_ones(x.shape[0]), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            break
        h = sigma.log() - sigma_next.log()
        target = denoised
        if previous is not None:
            r = (sigmas[i - 1].log() - sigma.log()) / h
            target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = (sigma_next / sigma) * x - torch.expm1(-h) * target
        previous = denoised
    return x


@torch.no_grad()
def sample_ddim(
    model: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    disable: bool | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) written in k-diffusion's variables (``x / sqrt(alpha)``,
    ``sigma = sqrt((1 - alpha) / alpha)``); use :func:`sigmas_ddim` for ldm's timesteps.

    With ``alpha = 1 / (1 + sigma^2)`` the update is
    ``x' = sqrt(a') x0 + sqrt(1 - a' - s^2) eps + s z``, ``s = eta sqrt((1-a')/(1-a)) sqrt(1 - a/a')``,
    rescaled by ``1 / sqrt(a')``. At ``eta = 0`` this equals an Euler step in sigma.
    """
    extra_args = extra_args or {}
    x = x.clone()
    for i in _steps(len(sigmas) - 1, disable):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * x.new_ones(x.shape[0]), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        eps = (x - denoised) / sigma
        a, a_next = 1 / (1 + sigma.double() ** 2), 1 / (1 + sigma_next.double() ** 2)
        s = eta * math.sqrt(float((1 - a_next) / (1 - a) * (1 - a / a_next))) if eta else 0.0
        x_alpha = a_next.sqrt() * denoised + (1 - a_next - s**2).clamp(min=0).sqrt() * eps
        if s > 0:
            x_alpha = x_alpha + s * _noise(x, generator)
        x = (x_alpha / a_next.sqrt()).to(x.dtype)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "euler": sample_euler,
    "euler_a": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddim": sample_ddim,
}
