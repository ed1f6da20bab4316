"""Mirror of modules.sd_samplers: create_sampler(name, model) -> a k-diffusion-style sampler.

The stand-in's inner model is k-diffusion's CompVisDenoiser shape (returns the denoised x0 from
the eps model) and the samplers are our reference ones.
"""

import torch

from lib_loraclr import sampling
from modules import shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser
from modules.sd_samplers_common import InterruptedException

SAMPLERS = {
    "Euler": ("sample_euler", None),
    "Euler a": ("sample_euler_ancestral", None),
    "DPM++ 2M": ("sample_dpmpp_2m", None),
    "DPM++ 2M Karras": ("sample_dpmpp_2m", "karras"),
    "DDIM": ("sample_ddim", "ddim"),
}


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
        self.funcname, self.schedule = SAMPLERS[name]
        self.model_wrap = CompVisDenoiser(sd_model)
        self.model_wrap_cfg = CFGDenoiser(self)
        self.model_wrap_cfg.model_wrap = self.model_wrap
        self.p = None

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        alphas = self.model_wrap.inner_model.alphas_cumprod
        if self.schedule == "karras":
            full = sampling.sigmas_from_alphas(alphas, 1000)
            sigmas = sampling.sigmas_karras(steps, float(full[-2]), float(full[0]))
        elif self.schedule == "ddim":
            sigmas = sampling.sigmas_ddim(alphas, steps)
        else:
            sigmas = sampling.sigmas_from_alphas(alphas, steps)
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = len(sigmas) - 1
        shared.state.sampling_steps = len(sigmas) - 1
        x = x * sigmas[0]
        extra = {"cond": conditioning, "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                 "s_min_uncond": 0.0, "image_cond": image_conditioning}

        def callback(d):
            shared.state.sampling_step = d["i"]

        kwargs = {"generator": p.generator} if self.funcname in ("sample_euler_ancestral", "sample_ddim") else {}
        try:
            return getattr(sampling, self.funcname)(self.model_wrap_cfg, x, sigmas, extra_args=extra, callback=callback,
                                                    disable=True, **kwargs)
        except InterruptedException:
            return x


def create_sampler(name, model):
    if name not in SAMPLERS:
        raise ValueError(f"implementation not found for sampler {name}")
    return KDiffusionSampler(name, model)
