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
        x_out = self.inner_model(
            params.x, params.sigma, cond={"c_crossattn": [cond_in], "c_concat": [image_cond]}
        )
        script_callbacks.cfg_denoised_callback(
            script_callbacks.CFGDenoisedParams(
                x_out, shared.state.sampling_step, shared.state.sampling_steps, self.inner_model
            )
        )
        denoised_uncond = x_out[batch:]
        denoised = denoised_uncond + (x_out[:batch] - denoised_uncond) * cond_scale
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
