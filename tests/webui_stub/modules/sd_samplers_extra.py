"""Mirror of modules.sd_samplers_extra.restart_sampler (A1111 1.8.0 and 1.10.1; Xu et al. 2023,
"Restart Sampling"): Heun steps over a Karras schedule; from 20 steps on, a restart segment near
sigma 0.1 is walked again after re-noising. As the host's: every Heun step calls the callback
after its FIRST call, and the step to sigma 0 is plain Euler (one call)."""

import torch

from lib_loraclr.sd.sampling import sigmas_karras


@torch.no_grad()
def restart_sampler(
    model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, generator=None
):
    extra_args = extra_args or {}
    ones = x.new_ones(x.shape[0])
    steps = len(sigmas) - 1
    pairs = []
    if steps >= 20:
        segment, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = sigmas_karras(steps - segment * times, float(sigmas[-2]), float(sigmas[0]))
        at = int(torch.argmin((sigmas - 0.1).abs()))
        top = int(torch.argmin((sigmas - 2.0).abs()))
        restart = sigmas_karras(segment + 1, float(sigmas[at]), float(sigmas[top]))[:-1]
        for i in range(len(sigmas) - 1):
            pairs.append((sigmas[i], sigmas[i + 1]))
            if i + 1 == at and top < at:
                pairs += list(zip(restart[:-1], restart[1:], strict=False)) * times
    else:
        pairs = list(zip(sigmas[:-1], sigmas[1:], strict=False))
    last = None
    for step, (sigma, nxt) in enumerate(pairs):
        if last is not None and last < sigma:  # back up the schedule: re-noise
            noise = (
                torch.randn(x.shape, generator=generator) if generator is not None else torch.randn_like(x)
            )
            x = x + noise * s_noise * (sigma**2 - last**2) ** 0.5
        denoised = model(x, sigma * ones, **extra_args)
        d = (x - denoised) / sigma
        if callback is not None:
            callback({"x": x, "i": step, "sigma": nxt, "sigma_hat": sigma, "denoised": denoised})
        if nxt == 0:
            x = x + d * (nxt - sigma)
        else:
            guess = x + d * (nxt - sigma)
            d_next = (guess - model(guess, nxt * ones, **extra_args)) / nxt
            x = x + (d + d_next) / 2 * (nxt - sigma)
        last = nxt
    return x
