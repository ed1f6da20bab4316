"""Mirror of the k-diffusion samplers (crowsonkb/k-diffusion ``k_diffusion/sampling.py``, the
commit A1111 1.8.0 and 1.10.1 pin) that call the denoiser more than once per step, or once per
step with their own noise: the same calls in the same order at the same sigmas, the callback
after each step's FIRST call (before a second one), and the running ``x`` reused after each call.

Written for the stand-in from the papers' update rules (Karras et al. 2022; Lu et al. 2022,
DPM-Solver++), not copied; ``noise_sampler(sigma, sigma_next)`` gives the step's noise (the host
passes a Brownian-tree sampler seeded per image; here: the generation's generator).
"""

import torch

from lib_loraclr.sd.sampling import ancestral_step


def to_d(x, sigma, denoised):
    return (x - denoised) / sigma


def _ones(x):
    return x.new_ones(x.shape[0])


def _noise_sampler(x, noise_sampler):
    if noise_sampler is not None:
        return noise_sampler
    return lambda sigma, sigma_next: torch.randn_like(x)


def _log_mid(a, b):
    return (a.log() + b.log()).div(2).exp()


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Karras et al. 2022, Algorithm 1 (no churn): Euler to sigma_next, then the trapezoid
    correction with a second call there; the step to sigma 0 is plain Euler (one call)."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * _ones(x), **extra_args)
        d = to_d(x, sigma, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if nxt == 0:
            x = x + d * (nxt - sigma)
            continue
        guess = x + d * (nxt - sigma)
        d_next = to_d(guess, nxt, model(guess, nxt * _ones(x), **extra_args))
        x = x + (d + d_next) / 2 * (nxt - sigma)
    return x


@torch.no_grad()
def sample_dpm_2(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """DPM-Solver-2 as k-diffusion runs it: the derivative at the log-midpoint (second call) carries
    the whole step; the step to sigma 0 is plain Euler."""
    extra_args = extra_args or {}
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * _ones(x), **extra_args)
        d = to_d(x, sigma, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if nxt == 0:
            x = x + d * (nxt - sigma)
            continue
        x = _midpoint_step(model, x, d, sigma, nxt, extra_args)
    return x


def _midpoint_step(model, x, d, sigma, target, extra_args):
    """DPM-Solver-2's step to ``target``: the derivative at the log-midpoint (the second call)."""
    mid = _log_mid(sigma, target)
    half = x + d * (mid - sigma)
    return x + to_d(half, mid, model(half, mid * _ones(x), **extra_args)) * (target - sigma)


@torch.no_grad()
def sample_dpm_2_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None
):
    """DPM-Solver-2 to sigma_down, then noise sigma_up (ancestral)."""
    extra_args = extra_args or {}
    noise = _noise_sampler(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * _ones(x), **extra_args)
        down, up = ancestral_step(sigma, sigmas[i + 1])
        d = to_d(x, sigma, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if down == 0:
            x = x + d * (down - sigma)
            continue
        x = _midpoint_step(model, x, d, sigma, down, extra_args)
        x = x + noise(sigma, sigmas[i + 1]) * up
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None
):
    """DPM-Solver++(2S) single-step to sigma_down (second call at the log-midpoint), then noise."""
    extra_args = extra_args or {}
    noise = _noise_sampler(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        denoised = model(x, sigma * _ones(x), **extra_args)
        down, up = ancestral_step(sigma, sigmas[i + 1])
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if down == 0:
            x = x + to_d(x, sigma, denoised) * (down - sigma)
        else:
            h = sigma.log() - torch.as_tensor(down).log()
            mid = sigma * (-h / 2).exp()
            half = (mid / sigma) * x - torch.expm1(-h / 2) * denoised
            x = (down / sigma) * x - torch.expm1(-h) * model(half, mid * _ones(x), **extra_args)
        if sigmas[i + 1] > 0:
            x = x + noise(sigma, sigmas[i + 1]) * up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DPM-Solver++ (stochastic, r = 1/2, eta = 1): an ancestral half step to the log-midpoint
    (second call there), then the full step with the averaged prediction; to sigma 0: Euler."""
    extra_args = extra_args or {}
    noise = _noise_sampler(x, noise_sampler)
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * _ones(x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if nxt == 0:
            x = x + to_d(x, sigma, denoised) * (nxt - sigma)
            continue
        mid = _log_mid(sigma, nxt)
        down, up = ancestral_step(sigma, mid)
        half = (down / sigma) * x - torch.expm1(torch.as_tensor(down).log() - sigma.log()) * denoised
        half = half + noise(sigma, mid) * up
        denoised_mid = model(half, mid * _ones(x), **extra_args)
        down, up = ancestral_step(sigma, nxt)
        x = (down / sigma) * x - torch.expm1(torch.as_tensor(down).log() - sigma.log()) * denoised_mid
        x = x + noise(sigma, nxt) * up
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None, solver_type="midpoint"
):
    """DPM-Solver++(2M) SDE (eta = 1): one call per step, a multistep correction from the previous
    prediction (midpoint or Heun form), fresh noise each step; to sigma 0: the prediction."""
    extra_args = extra_args or {}
    noise = _noise_sampler(x, noise_sampler)
    previous, h_last = None, None
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * _ones(x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if nxt == 0:
            x = denoised
            continue
        h = sigma.log() - nxt.log()
        gain = torch.expm1(-2 * h).neg()
        x = (nxt / sigma) * (-h).exp() * x + gain * denoised
        if previous is not None:
            r = h_last / h
            weight = (gain / (-2 * h) + 1) if solver_type == "heun" else 0.5 * gain
            x = x + weight / r * (denoised - previous)
        x = x + noise(sigma, nxt) * nxt * gain.sqrt()
        previous, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """DPM-Solver++(3M) SDE (eta = 1): one call per step, up to two earlier predictions in the
    multistep correction, fresh noise each step."""
    extra_args = extra_args or {}
    noise = _noise_sampler(x, noise_sampler)
    history = []  # (denoised, h) of earlier steps, newest first
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma * _ones(x), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if nxt == 0:
            x = denoised
            continue
        h = sigma.log() - nxt.log()
        h2 = 2 * h
        x = (-h2).exp() * x + torch.expm1(-h2).neg() * denoised
        phi2 = torch.expm1(-h2) / h2 + 1
        if len(history) >= 2:
            (d1, h1), (d2, h2_) = history[:2]
            r0, r1 = h1 / h, h2_ / h
            slope0, slope1 = (denoised - d1) / r0, (d1 - d2) / r1
            first = slope0 + (slope0 - slope1) * r0 / (r0 + r1)
            second = (slope0 - slope1) / (r0 + r1)
            x = x + phi2 * first - (phi2 / h2 - 0.5) * second
        elif history:
            d1, h1 = history[0]
            x = x + phi2 * (denoised - d1) / (h1 / h)
        x = x + noise(sigma, nxt) * nxt * torch.expm1(-2 * h).neg().sqrt()
        history = [(denoised, h), *history[:1]]
    return x
