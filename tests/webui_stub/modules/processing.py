"""Mirror of modules.processing: the txt2img object and process_images' script life cycle.

The order of hooks is the real one (A1111 1.8.0 ``process_images_inner``): scripts.process ->
p.init (img2img creates its sampler here) -> per batch: before_process_batch -> parse_extra_network_prompts -> extra_networks.activate ->
process_batch -> setup_conds -> p.sample -> postprocess_batch; then scripts.postprocess.
"""

import torch

from modules import errors, extra_networks, sd_samplers, shared


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", infotexts=None):
        self.images = images_list
        self.prompt = p.prompt
        self.seed = seed
        self.info = info
        self.infotexts = infotexts or [info] * len(images_list)
        self.extra_generation_params = dict(p.extra_generation_params)


class StableDiffusionProcessing:
    def __init__(
        self,
        sd_model=None,
        prompt="",
        negative_prompt="",
        seed=-1,
        sampler_name="Euler",
        batch_size=1,
        n_iter=1,
        steps=20,
        cfg_scale=7.0,
        width=512,
        height=512,
        enable_hr=False,
        scripts=None,
        script_args=None,
        **kwargs,
    ):
        self.sd_model = sd_model or shared.sd_model
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.seed = seed
        self.sampler_name = sampler_name
        self.batch_size = batch_size
        self.n_iter = n_iter
        self.steps = steps
        self.cfg_scale = cfg_scale
        self.width = width
        self.height = height
        self.enable_hr = enable_hr
        self.scripts = scripts
        self.script_args = list(script_args or [])
        self.extra_generation_params = {}
        self.disable_extra_networks = False
        self.extra_network_data = {}
        self.is_hr_pass = False
        self.comments = {}
        for k, v in kwargs.items():
            setattr(self, k, v)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def comment(self, text):
        self.comments[text] = 1

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)
        return self.extra_network_data

    def setup_conds(self):
        self.c = self.sd_model.get_learned_conditioning(self.prompts)
        self.uc = self.sd_model.get_learned_conditioning(self.negative_prompts)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """txt2img; with ``enable_hr`` the host's hires fix (1.8.0 ``sample_hr_pass``) with a latent
    upscaler: ``is_hr_pass`` set, a NEW sampler (``hr_sampler_name`` or the same), the latent
    upscaled to ``hr_scale``, the hires tags activated (``hr_extra_network_data``), the
    ``before_hr`` hook, then ``sample_img2img`` at ``denoising_strength`` over
    ``hr_second_pass_steps or steps`` with the hires prompts' conds."""

    def __init__(
        self,
        hr_scale=2.0,
        denoising_strength=0.5,
        hr_second_pass_steps=0,
        hr_sampler_name=None,
        hr_prompt="",
        hr_negative_prompt="",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hr_scale = hr_scale
        self.denoising_strength = denoising_strength
        self.hr_second_pass_steps = hr_second_pass_steps
        self.hr_sampler_name = hr_sampler_name
        self.hr_prompt = hr_prompt
        self.hr_negative_prompt = hr_negative_prompt
        self.hr_upscale_to_x = int(self.width * hr_scale)
        self.hr_upscale_to_y = int(self.height * hr_scale)
        self.hr_extra_network_data = {}
        self.all_hr_prompts = self.all_hr_negative_prompts = None
        self.hr_c = self.hr_uc = None

    def setup_hr_prompts(self):
        """As the host's ``setup_prompts``: an empty hires prompt is the prompt."""
        if not self.enable_hr:
            return
        hr_prompt = self.hr_prompt or self.prompt
        hr_negative = self.hr_negative_prompt or self.negative_prompt
        n = self.batch_size * self.n_iter
        self.all_hr_prompts = list(hr_prompt) if isinstance(hr_prompt, list) else [hr_prompt] * n
        self.all_hr_negative_prompts = [hr_negative] * n

    def parse_extra_network_prompts(self):
        res = super().parse_extra_network_prompts()
        if self.enable_hr:
            batch = slice(self.iteration * self.batch_size, (self.iteration + 1) * self.batch_size)
            self.hr_prompts = self.all_hr_prompts[batch]
            self.hr_negative_prompts = self.all_hr_negative_prompts[batch]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)
        return res

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        shape = (len(seeds), 4, self.height // 8, self.width // 8)
        x = torch.stack(
            [torch.randn(shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )
        self.generator = torch.Generator().manual_seed(int(seeds[0]) + 1)
        samples = self.sampler.sample(
            self,
            x,
            conditioning,
            unconditional_conditioning,
            image_conditioning=x.new_zeros(x.shape[0], 5, 1, 1),
        )
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples, seeds)

    def sample_hr_pass(self, samples, seeds):
        if shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        size = (self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8)
        samples = torch.nn.functional.interpolate(samples, size=size, mode="bilinear")
        noise = torch.stack(
            [torch.randn(samples.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        )
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)
        self.hr_c = self.sd_model.get_learned_conditioning(self.hr_prompts)
        self.hr_uc = self.sd_model.get_learned_conditioning(self.hr_negative_prompts)
        if self.scripts is not None:
            self.scripts.before_hr(self)
        samples = self.sampler.sample_img2img(
            self,
            samples,
            noise,
            self.hr_c,
            self.hr_uc,
            steps=self.hr_second_pass_steps or self.steps,
            image_conditioning=samples.new_zeros(samples.shape[0], 5, 1, 1),
        )
        self.sampler = None
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """img2img as the host runs it: ``init`` creates the sampler and the init latent (before any
    ``p.sample``), ``sample`` calls ``sampler.sample_img2img``. The stand-in takes the init latent
    directly (``init_latent``, one per image) and an optional latent-size ``image_mask`` (h, w) in
    [0, 1] (1 = inpaint), which becomes the host's ``mask``/``nmask`` of shape (4, h, w); after
    sampling the host blends once more (``on_mask_blend`` with ``is_final_blend``)."""

    def __init__(self, init_latent=None, denoising_strength=0.75, image_mask=None, **kwargs):
        super().__init__(**kwargs)
        self.init_latent_source = init_latent
        self.denoising_strength = denoising_strength
        self.image_mask = image_mask
        self.mask = self.nmask = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        self.init_latent = self.init_latent_source.expand(self.batch_size, -1, -1, -1).clone()
        if self.image_mask is not None:
            latmask = self.image_mask.reshape(self.init_latent.shape[-2:])[None].expand(4, -1, -1)
            self.mask = 1.0 - latmask
            self.nmask = latmask.clone()

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        shape = self.init_latent.shape[1:]
        x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
        self.generator = torch.Generator().manual_seed(int(seeds[0]) + 1)
        samples = self.sampler.sample_img2img(
            self,
            self.init_latent,
            x,
            conditioning,
            unconditional_conditioning,
            image_conditioning=x.new_zeros(x.shape[0], 5, 1, 1),
        )
        if self.mask is not None:
            blended = samples * self.nmask + self.init_latent * self.mask
            if self.scripts is not None:
                from modules import scripts

                args = scripts.MaskBlendArgs(samples, self.nmask, self.init_latent, self.mask, blended)
                self.scripts.on_mask_blend(self, args)
                blended = args.blended_latent
            samples = blended
        return samples


def create_infotext(p, index):
    """As the host's ``create_infotext`` (1.8.0), per image after its batch: the image's prompt and
    ``extra_generation_params`` as they are then (the same values for every image of the job; 1.8.0
    does not index list values); the stand-in's infotext is the dict's ``str``."""
    return str({"Prompt": p.all_prompts[index], **p.extra_generation_params})


def process_images(p):
    seed = p.seed if p.seed >= 0 else 1234
    # as the host's setup_prompts: a list prompt gives every image its own prompt
    p.all_prompts = list(p.prompt) if isinstance(p.prompt, list) else [p.prompt] * (p.batch_size * p.n_iter)
    p.all_negative_prompts = [p.negative_prompt] * (p.batch_size * p.n_iter)
    p.all_seeds = [seed + i for i in range(p.batch_size * p.n_iter)]
    if getattr(p, "enable_hr", False):
        p.setup_hr_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    p.init(p.all_prompts, p.all_seeds, p.all_seeds)
    images, infotexts = [], []
    shared.state.job_count = p.n_iter
    with torch.no_grad():
        for n in range(p.n_iter):
            if shared.state.interrupted:
                break
            p.iteration = n
            p.prompts = p.all_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.negative_prompts = p.all_negative_prompts[n * p.batch_size : (n + 1) * p.batch_size]
            p.seeds = p.all_seeds[n * p.batch_size : (n + 1) * p.batch_size]
            if p.scripts is not None:
                p.scripts.before_process_batch(
                    p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds
                )
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
            p.setup_conds()
            samples = p.sample(
                conditioning=p.c,
                unconditional_conditioning=p.uc,
                seeds=p.seeds,
                subseeds=p.seeds,
                subseed_strength=0,
                prompts=p.prompts,
            )
            decoded = (
                p.sd_model.decode_first_stage(samples)
                if hasattr(p.sd_model, "decode_first_stage")
                else samples
            )
            images += list(decoded)
            infotexts += [create_infotext(p, n * p.batch_size + i) for i in range(len(decoded))]
            shared.state.nextjob()
    processed = Processed(p, images, seed, infotexts[0] if infotexts else "", infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed


class ScriptRunner:
    """The alwayson part of modules.scripts.ScriptRunner: each script gets args[args_from:args_to];
    an exception in a hook is reported (``modules.errors.report``) and the generation goes on."""

    def __init__(self, scripts_with_args):
        self.alwayson_scripts = []
        self.args = []
        for script, args in scripts_with_args:
            script.args_from = len(self.args)
            self.args += list(args)
            script.args_to = len(self.args)
            self.alwayson_scripts.append(script)

    def _call(self, name, p, *extra, **kwargs):
        for script in self.alwayson_scripts:
            try:  # the real runner logs a hook's exception and carries on with the generation
                getattr(script, name)(p, *extra, *p.script_args[script.args_from : script.args_to], **kwargs)
            except Exception:
                errors.report(f"Error running {name}: {type(script).__name__}", exc_info=True)

    def process(self, p):
        self._call("process", p)

    def before_process_batch(self, p, **kwargs):
        self._call("before_process_batch", p, **kwargs)

    def process_batch(self, p, **kwargs):
        self._call("process_batch", p, **kwargs)

    def postprocess(self, p, processed):
        self._call("postprocess", p, processed)

    def before_hr(self, p):
        self._call("before_hr", p)

    def on_mask_blend(self, p, mba):
        self._call("on_mask_blend", p, mba)
