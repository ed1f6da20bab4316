"""Mirror of modules.sd_samplers_cfg_denoiser.CFGDenoiser (plain tensor conds, no AND prompts),
with the host's inpainting blend (``apply_blend``: ``current * nmask + init_latent * mask``, then
the scripts' ``on_mask_blend``) of the result, or of the input with ``mask_before_denoising``."""

import torch

from modules import script_callbacks, shared
from modules.sd_samplers_common import InterruptedException


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.p = None
        self.mask_before_denoising = False  # the k-diffusion denoiser blends its result
        self.cond_scale_miltiplier = 1.0  # (sic, the host's name) DDIM CFG++ sets 1 / 12.5
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None

    @property
    def inner_model(self):
        return self.model_wrap

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if shared.state.interrupted or shared.state.skipped:
            raise InterruptedException

        def apply_blend(current):  # inpainting, as the host: scripts may change the blend
            blended = current * self.nmask + self.init_latent * self.mask
            if self.p.scripts is not None:
                from modules import scripts

                args = scripts.MaskBlendArgs(
                    current, self.nmask, self.init_latent, self.mask, blended, denoiser=self, sigma=sigma
                )
                self.p.scripts.on_mask_blend(self.p, args)
                blended = args.blended_latent
            return blended

        if self.mask_before_denoising and self.mask is not None:
            x = apply_blend(x)
        batch = x.shape[0]
        x_in = torch.cat([x, x])
        sigma_in = torch.cat([sigma, sigma])
        cond_in = torch.cat([cond, uncond])
        params = script_callbacks.CFGDenoiserParams(
            x_in,
            image_cond,
            sigma_in,
            shared.state.sampling_step,
            shared.state.sampling_steps,
            cond,
            uncond,
            self,
        )
        script_callbacks.cfg_denoiser_callback(params)
        x_in, sigma_in = params.x, params.sigma
        # 1.10's "Skip Early CFG" and NGMS (1.8.0: NGMS on every other call only; its options are absent)
        skip_early = getattr(shared.opts, "skip_early_cond", 0.0)
        ngms_all = getattr(shared.opts, "s_min_uncond_all", False)
        skip_uncond = False
        if skip_early != 0.0 and self.step / self.total_steps <= skip_early:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = skip_early
        elif (self.step % 2 or ngms_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
            if ngms_all:
                self.p.extra_generation_params["NGMS all steps"] = ngms_all
        if skip_uncond:
            x_in, sigma_in, cond_in = x_in[:batch], sigma_in[:batch], cond
        x_out = self.inner_model(x_in, sigma_in, cond={"c_crossattn": [cond_in], "c_concat": [image_cond]})
        if skip_uncond:
            x_out = torch.cat([x_out, x_out[:batch]])  # the prompt's prediction where the uncond's was
        script_callbacks.cfg_denoised_callback(
            script_callbacks.CFGDenoisedParams(
                x_out, shared.state.sampling_step, shared.state.sampling_steps, self.inner_model
            )
        )
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[batch:])
        denoised_uncond = x_out[batch:]
        scale = 1.0 if skip_uncond else cond_scale * self.cond_scale_miltiplier
        denoised = denoised_uncond + (x_out[:batch] - denoised_uncond) * scale
        if not self.mask_before_denoising and self.mask is not None:
            denoised = apply_blend(denoised)
        self.step += 1
        return denoised


class CFGDenoiserTimesteps(CFGDenoiser):
    """Mirror of modules.sd_samplers_timesteps.CFGDenoiserTimesteps: same call, timesteps for
    ``sigma`` and eps out; ``alphas`` is the model's ``alphas_cumprod``."""

    def __init__(self, sampler):
        super().__init__(sampler)
        self.alphas = shared.sd_model.alphas_cumprod
        self.mask_before_denoising = True
