"""Mirror of modules.sd_samplers: create_sampler(name, model) -> a sampler.

As in A1111 1.8.0 the k-diffusion samplers wrap the model in a CompVisDenoiser (sigma in, the
denoised x0 out) under a ``CFGDenoiser``, while DDIM runs through ``CompVisSampler``: timesteps
in, eps out, under a ``CFGDenoiserTimesteps`` that carries the model's ``alphas``, with the
sampler's loop reusing the latent it passed to the denoiser (modules/sd_samplers_timesteps*.py).
Each k-diffusion sampler carries the host's options (``modules/sd_samplers_kdiffusion.py``):
``second_order`` doubles the denoiser's ``total_steps`` (the host's expected number of calls),
``discard_next_to_last_sigma`` drops the penultimate sigma of ``steps + 1``, and the SDE samplers
get a per-generation noise sampler (the host's is a Brownian tree).
"""

import torch
from k_diffusion import sampling as k_sampling

from lib_loraclr.sd import sampling
from modules import sd_samplers_extra, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser, CFGDenoiserTimesteps
from modules.sd_samplers_common import InterruptedException

_SECOND = {"second_order": True}
_NOISE = {"noise_sampler": True}
SAMPLERS = {
    "Euler": (sampling.sample_euler, {}),
    "Euler a": (sampling.sample_euler_ancestral, {"generator": True}),
    "DPM++ 2M": (sampling.sample_dpmpp_2m, {}),
    "DPM++ 2M Karras": (sampling.sample_dpmpp_2m, {"scheduler": "karras"}),
    "Heun": (k_sampling.sample_heun, _SECOND),
    "DPM2": (k_sampling.sample_dpm_2, {**_SECOND, "discard_next_to_last_sigma": True}),
    "DPM2 a": (k_sampling.sample_dpm_2_ancestral, {**_SECOND, **_NOISE, "discard_next_to_last_sigma": True}),
    "DPM++ 2S a": (k_sampling.sample_dpmpp_2s_ancestral, {**_SECOND, **_NOISE}),
    "DPM++ SDE": (k_sampling.sample_dpmpp_sde, {**_SECOND, **_NOISE}),
    "DPM++ 2M SDE": (k_sampling.sample_dpmpp_2m_sde, _NOISE),
    "DPM++ 2M SDE Heun": (k_sampling.sample_dpmpp_2m_sde, {**_NOISE, "solver_type": "heun"}),
    "DPM++ 3M SDE": (k_sampling.sample_dpmpp_3m_sde, {**_NOISE, "discard_next_to_last_sigma": True}),
    "Restart": (sd_samplers_extra.restart_sampler, {**_SECOND, "scheduler": "karras", "generator": True}),
}
TIMESTEP_SAMPLERS = ("DDIM", "DDIM CFG++")


def setup_img2img_steps(p, steps=None):
    """As the host's (sd_samplers_common): steps passed in (the hires pass passes its own) are
    the steps to RUN, so the schedule is that many over the denoising strength; otherwise the
    strength's share of ``p.steps`` runs."""
    if steps is not None:
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        return steps, requested - 1
    return p.steps, int(min(p.denoising_strength, 0.999) * p.steps)


class CompVisDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        self.schedule = sampling.DiscreteSchedule(model.alphas_cumprod)

    def forward(self, x, sigma, cond=None):
        view = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        eps = self.inner_model.apply_model(x / (view**2 + 1) ** 0.5, self.schedule.sigma_to_t(sigma), cond)
        return x - eps * view


class KDiffusionSampler:
    def __init__(self, name, sd_model):
        self.name = name
        self.func, self.options = SAMPLERS[name]
        self.schedule = self.options.get("scheduler")
        self.model_wrap = CompVisDenoiser(sd_model)
        self.model_wrap_cfg = CFGDenoiser(self)
        self.model_wrap_cfg.model_wrap = self.model_wrap
        self.p = None

    def get_sigmas(self, steps, scheduler=None):
        """1.8 names the schedule in the sampler ("DPM++ 2M Karras"); 1.9+ takes it from
        ``p.scheduler`` ("Automatic": the sampler's default)."""
        alphas = self.model_wrap.inner_model.alphas_cumprod
        discard = self.options.get("discard_next_to_last_sigma", False)
        steps += 1 if discard else 0
        if self.schedule == "karras" or scheduler == "Karras":
            full = sampling.sigmas_from_alphas(alphas, 1000)
            sigmas = sampling.sigmas_karras(steps, float(full[-2]), float(full[0]))
        else:
            sigmas = sampling.sigmas_from_alphas(alphas, steps)
        return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas

    def sample_img2img(
        self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None
    ):
        """The host's img2img: the tail of the schedule from t_enc on, starting at x + noise * sigma."""
        steps, t_enc = setup_img2img_steps(p, steps)
        sigma_sched = self.get_sigmas(steps, getattr(p, "scheduler", None))[steps - t_enc - 1 :]
        self.model_wrap_cfg.init_latent = x
        return self._run(
            p,
            x + noise * sigma_sched[0],
            sigma_sched,
            conditioning,
            unconditional_conditioning,
            image_conditioning,
        )

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(steps, getattr(p, "scheduler", None))
        self.sigmas = sigmas
        return self._run(
            p, x * sigmas[0], sigmas, conditioning, unconditional_conditioning, image_conditioning
        )

    def _run(self, p, x, sigmas, conditioning, unconditional_conditioning, image_conditioning):
        steps = len(sigmas) - 1
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0  # Sampler.initialize
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.steps = steps  # launch_sampling: steps and the expected number of calls
        self.model_wrap_cfg.total_steps = steps * 2 if self.options.get("second_order") else steps
        shared.state.sampling_steps = steps
        extra = {
            "cond": conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": float(getattr(p, "s_min_uncond", 0.0) or 0.0),
            "image_cond": image_conditioning,
        }

        def callback(d):
            shared.state.sampling_step = d["i"]

        kwargs = {}
        if self.options.get("generator"):
            kwargs["generator"] = p.generator
        if self.options.get("noise_sampler"):
            kwargs["noise_sampler"] = lambda sigma, sigma_next: torch.randn(x.shape, generator=p.generator)
        if "solver_type" in self.options:
            kwargs["solver_type"] = self.options["solver_type"]
        try:
            return self.func(
                self.model_wrap_cfg, x, sigmas, extra_args=extra, callback=callback, disable=True, **kwargs
            )
        except InterruptedException:
            return x


class CompVisTimestepsDenoiser(torch.nn.Module):
    """Timesteps in, the model's eps out."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


def ddim_cfgpp(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """1.10's DDIM CFG++ (Chung et al. 2024), eta 0: the denoiser's scale divided by 12.5 and the
    step's direction taken from the UNCONDITIONAL eps the denoiser records (``last_noise_uncond``)."""
    model.cond_scale_miltiplier = 1 / 12.5
    model.need_last_noise_uncond = True
    return _ddim_steps(model, x, timesteps, extra_args, callback, lambda eps: model.last_noise_uncond)


def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None):
    """Deterministic DDIM (eta 0) over ascending ``timesteps``, ``len(timesteps) - 1`` model calls,
    each on the current latent, which the update then reads again (as the host's loop does)."""
    return _ddim_steps(model, x, timesteps, extra_args, callback, lambda eps: eps)


def _ddim_steps(model, x, timesteps, extra_args, callback, direction):
    """The DDIM loop both share; ``direction(eps)`` is the eps that re-noises x0 to the next step."""
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    ones = x.new_ones(x.shape[0])
    extra_args = extra_args or {}
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        a_t = float(alphas_cumprod[timesteps[index]])
        a_prev = float(alphas_cumprod[timesteps[index - 1]]) if index > 0 else float(alphas_cumprod[0])
        eps = model(x, float(timesteps[index]) * ones, **extra_args)
        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5
        x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * direction(eps)
        if callback is not None:
            callback({"x": x, "i": i, "denoised": x0})
    return x


class CompVisSampler:
    def __init__(self, name, sd_model):
        self.name = name
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.model_wrap = CompVisTimestepsDenoiser(sd_model)
        self.last_latent = None

    def sample_img2img(
        self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None
    ):
        """The host's img2img: the first t_enc timesteps (t_enc - 1 model calls), starting at
        sqrt(a) x + sqrt(1 - a) noise with a at timestep t_enc."""
        steps, t_enc = setup_img2img_steps(p, steps)
        timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
        a = float(shared.sd_model.alphas_cumprod[timesteps[t_enc]])
        self.model_wrap_cfg.init_latent = x
        xi = x * a**0.5 + noise * (1 - a) ** 0.5
        return self._run(
            p, xi, timesteps[:t_enc], conditioning, unconditional_conditioning, image_conditioning
        )

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = torch.clip(torch.arange(0, 1000, 1000 // steps) + 1, 0, 999)
        return self._run(p, x, timesteps, conditioning, unconditional_conditioning, image_conditioning)

    def _run(self, p, x, timesteps, conditioning, unconditional_conditioning, image_conditioning):
        steps = len(timesteps)
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.step = 0  # Sampler.initialize
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps
        shared.state.sampling_steps = steps
        self.last_latent = x
        extra = {
            "cond": conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": float(getattr(p, "s_min_uncond", 0.0) or 0.0),
            "image_cond": image_conditioning,
        }

        def callback(d):
            shared.state.sampling_step = d["i"]
            self.last_latent = d["denoised"]

        try:
            loop = ddim_cfgpp if self.name == "DDIM CFG++" else ddim
            return loop(self.model_wrap_cfg, x, timesteps, extra_args=extra, callback=callback, disable=True)
        except InterruptedException:
            return self.last_latent


def create_sampler(name, model):
    if name in TIMESTEP_SAMPLERS:
        return CompVisSampler(name, model)
    if name not in SAMPLERS:
        raise ValueError(f"implementation not found for sampler {name}")
    return KDiffusionSampler(name, model)
