"""WebUI adapter for CLoRA composition: an always-on txt2img/img2img script (accordion "CLoRA composition").

Thin by design: ``*args`` become :class:`CloraSettings` on each hook's first line; the plan comes
from ``lib_loraclr.clora.prompts``; sampling runs through ``lib_loraclr.webui.clora_sampling.clora_sampling``
around this generation's ``p.sample`` only (A1111 calls no hook when a generation fails, so
nothing may outlive that call).
"""

from __future__ import annotations

import contextlib
import logging

import gradio as gr
from modules import scripts, sd_samplers, shared

from lib_loraclr import families
from lib_loraclr.clora.attention import MAP_LEVEL_CHOICES
from lib_loraclr.clora.prompts import is_and_prompt, plan_composition, split_bindings
from lib_loraclr.clora.settings import INFOTEXT_KEY, MORPHOLOGY, STEP_MODES, CloraSettings
from lib_loraclr.clora.tokens import tokenizer_counter
from lib_loraclr.errors import LoraClrError
from lib_loraclr.lora.file import check_base_model, load_lora
from lib_loraclr.lora.tags import remove_tags
from lib_loraclr.merge.request import find_lora_file
from lib_loraclr.webui import samplers
from lib_loraclr.webui.clora_sampling import GenerationState, clora_sampling
from lib_loraclr.webui.host import BINDING_HEADERS, bindings_rows, clora_gallery, embedding_vectors
from lib_loraclr.webui.model import require_sd1
from lib_loraclr.webui.patches import wrap_once

log = logging.getLogger("sd-webui-loraclr")
STATE_ATTR = "loraclr_clora_state"

HELP = (  # Markdown: tags in code spans, or the renderer takes <lora:...> for a link and drops the brackets
    "Write `<lora:NAME:WEIGHT>` directly before a subject to bind it, e.g. "
    "`a <lora:blackcat:1> cat and a <lora:corgi:0.8> dog in the forest`. Tags not followed by a word "
    "(styles) stay with the built-in Lora and apply to everything. " + samplers.help_text()
)


def _networks():
    import networks

    return networks


def _lora_file(name: str) -> str:
    filename = find_lora_file(_networks(), name)
    if filename is None:
        raise LoraClrError(
            f"CLoRA: LoRA {name!r} not found; check the name in the Lora tab (refresh after adding files)"
        )
    return filename


def bindings_view(prompt: str) -> tuple[list[list], str]:
    """The table as text (a number column shows an empty cell as a weight of 0, which reads like
    a binding): each weight as written, and one blank row when nothing is bound (the note says why)."""
    rows, note = bindings_rows(_networks(), prompt)
    shown = [[lora, f"{weight:g}", subject, trigger] for lora, weight, subject, trigger in rows]
    return (shown or [["", "", "", ""]]), note


class CloraUI:
    """Owns the components, in the order of :class:`CloraSettings` fields."""

    def __init__(self, script: scripts.Script) -> None:
        d = CloraSettings()
        with gr.Accordion("CLoRA composition", open=False, elem_id=script.elem_id("accordion")):
            gr.Markdown(HELP)
            with gr.Row():
                self.enabled = gr.Checkbox(label="Enable", value=False, elem_id=script.elem_id("enabled"))
                self.show_masks = gr.Checkbox(
                    label="Show attention masks",
                    value=bool(getattr(shared.opts, "loraclr_clora_show_masks", False)),
                    elem_id=script.elem_id("show_masks"),
                )
            with gr.Row():
                self.step_mode = gr.Dropdown(
                    list(STEP_MODES),
                    value=d.step_mode,
                    label="Latent update",
                    elem_id=script.elem_id("step_mode"),
                )
                self.relative_step = gr.Slider(
                    0.005,
                    0.2,
                    value=d.relative_step,
                    step=0.005,
                    label="Relative step (x latent norm)",
                    elem_id=script.elem_id("relative_step"),
                )
                self.map_level = gr.Dropdown(
                    list(MAP_LEVEL_CHOICES),
                    value=d.map_level,
                    label="Attention-map resolution",
                    elem_id=script.elem_id("map_level"),
                )
            with gr.Row():
                self.step_size = gr.Slider(
                    0,
                    100,
                    value=d.step_size,
                    step=0.5,
                    label="Step size",
                    elem_id=script.elem_id("step_size"),
                )
                self.max_step = gr.Slider(
                    0,
                    150,
                    value=d.max_step,
                    step=1,
                    label="Update latents until step",
                    elem_id=script.elem_id("max_step"),
                )
            with gr.Row():
                self.refine_steps = gr.Textbox(
                    value=",".join(map(str, d.refine_steps)),
                    label="Refinement at steps",
                    elem_id=script.elem_id("refine_steps"),
                )
                self.refine_iterations = gr.Slider(
                    0,
                    50,
                    value=d.refine_iterations,
                    step=1,
                    label="Refinement iterations",
                    elem_id=script.elem_id("refine_iterations"),
                )
                self.temperature = gr.Slider(
                    0.05,
                    2.0,
                    value=d.temperature,
                    step=0.05,
                    label="Temperature",
                    elem_id=script.elem_id("temperature"),
                )
            with gr.Row():
                self.mask_threshold = gr.Slider(
                    0.05,
                    0.95,
                    value=d.mask_threshold,
                    step=0.05,
                    label="Mask threshold (x max)",
                    elem_id=script.elem_id("mask_threshold"),
                )
                self.mask_from_step = gr.Slider(
                    0,
                    150,
                    value=d.mask_from_step,
                    step=1,
                    label="Masks from step",
                    elem_id=script.elem_id("mask_from_step"),
                )
                self.morphology = gr.Dropdown(
                    list(MORPHOLOGY),
                    value=d.morphology,
                    label="Mask morphology",
                    elem_id=script.elem_id("morphology"),
                )
            with gr.Row():
                self.reuse_prediction = gr.Checkbox(
                    label="Reuse the pre-update prediction (paper)",
                    value=d.reuse_prediction,
                    elem_id=script.elem_id("reuse_prediction"),
                )
                self.cond_only_loss = gr.Checkbox(
                    label="Loss on the prompt half only (faster)",
                    value=d.cond_only_loss,
                    elem_id=script.elem_id("cond_only_loss"),
                )
            self.bindings = gr.Dataframe(
                headers=BINDING_HEADERS,
                datatype=["str", "str", "str", "str"],
                col_count=(4, "fixed"),
                interactive=False,
                label="Bindings parsed from the prompt (updated when the prompt loses focus)",
                elem_id=script.elem_id("bindings"),
            )
            self.bindings_note = gr.Markdown(elem_id=script.elem_id("bindings_note"))
        prompt = getattr(script, "prompt_box", None)
        if prompt is not None:  # this tab's prompt, caught by on_after_component
            for event in (prompt.blur, self.enabled.change):
                event(
                    fn=bindings_view,
                    inputs=[prompt],
                    outputs=[self.bindings, self.bindings_note],
                    show_progress=False,
                )

    def components(self) -> list:
        return [getattr(self, name) for name in CloraSettings.field_names()]

    def infotext_fields(self) -> list:
        """Paste fields: PNG info / "send to txt2img" restore every setting from the CLoRA entry
        (an infotext without one turns "Enable" off, so a plain image's parameters stay plain)."""

        def reader(name: str):
            def read(params):
                value = CloraSettings.paste_value(params, name)
                return gr.update() if value is None else value

            return read

        return [
            (getattr(self, name), reader(name))
            for name in CloraSettings.field_names()
            if name != "show_masks"
        ]


class CloraScript(scripts.Script):
    def __init__(self) -> None:
        super().__init__()
        self.prompt_boxes = {}
        for elem_id in ("txt2img_prompt", "img2img_prompt"):  # every runner sees every component
            self.on_after_component(
                lambda event, key=elem_id: self.prompt_boxes.__setitem__(key, event.component),
                elem_id=elem_id,
            )

    @property
    def prompt_box(self):
        return self.prompt_boxes.get("img2img_prompt" if self.is_img2img else "txt2img_prompt")

    def title(self):
        return "CLoRA composition"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        self.view = CloraUI(self)
        self.infotext_fields = self.view.infotext_fields()
        self.paste_field_names = [INFOTEXT_KEY]
        return self.view.components()

    def process(self, p, *args):
        state = GenerationState(CloraSettings())
        with _held_for_sampling(state):  # an API request's bad settings fail it (400), never "off"
            state.settings = CloraSettings.from_args(args)
        if state.error is None and not state.settings.enabled:
            return
        setattr(p, STATE_ATTR, state)
        if state.error is not None:
            return
        with _held_for_sampling(state):
            require_sd1(p.sd_model)  # before any LoRA is read: SD3/SDXL/SD2 are refused by name
            sampler, schedule = samplers.of(p)  # 1.9+: p.scheduler; 1.8: "DPM++ 2M Karras"
            hires = getattr(p, "hr_sampler_name", None) if getattr(p, "enable_hr", False) else None
            for name in (sampler, samplers.sampler_and_schedule(hires)[0] if hires else sampler):
                if name not in samplers.SUPPORTED_SAMPLERS:
                    raise LoraClrError(samplers.unsupported_sampler_message(name))
            log.info("CLoRA composition with sampler %s, schedule type %s", sampler, schedule)
            if any(is_and_prompt(prompt) for prompt in getattr(p, "all_prompts", [p.prompt])):
                raise LoraClrError(
                    "CLoRA: AND prompts are not supported; write one prompt per image (or disable CLoRA composition)"
                )

    def before_process_batch(self, p, *args, **kwargs):
        state = getattr(p, STATE_ATTR, None)
        if state is None or state.error is not None:
            return
        with _held_for_sampling(state):
            self._plan_batch(p, state)

    def _plan_batch(self, p, state: GenerationState) -> None:
        wrapped = getattr(p.sd_model.cond_stage_model, "wrapped", None)
        tokenizer = (
            wrapped.tokenizer if wrapped is not None and hasattr(wrapped, "tokenizer") else _tokenizer()
        )
        loras = dict(state.loras)  # an earlier batch's LoRAs are not read again

        def lora(name: str):
            if name not in loras:
                loras[name] = load_lora(_lora_file(name))
            return loras[name]

        def trigger(name: str) -> str:
            words = lora(name).trigger_words
            return words[0] if words else ""

        counter = tokenizer_counter(tokenizer)
        # the user's setting decides where a full 75-token chunk moves back to its last comma
        backtrack = int(getattr(shared.opts, "comma_padding_backtrack", 20))
        embeddings = embedding_vectors(_embedding_db())  # a name there is its vectors' positions
        by_prompt = {}  # every image is planned from its own prompt; equal prompts share a plan

        def plan_of(prompt: str):
            if prompt not in by_prompt:
                by_prompt[prompt] = plan_composition(
                    prompt, counter, trigger, comma_backtrack=backtrack, embeddings=embeddings
                )
            return by_prompt[prompt]

        plans = [plan_of(prompt) for prompt in p.prompts]
        hires = _hires_batch(p)  # the hires pass composes from the hires prompts, when they bind
        state.hr_plans = [plan_of(x) for x in hires[1]] if hires and all(map(_binds, hires[1])) else None
        bound = {b.lora for each in [*plans, *(state.hr_plans or [])] for b in each.bindings}
        for each in by_prompt.values():  # where each concept's tokens are (also in the server log)
            log.info("CLoRA plan for %r: token groups %s", each.base_prompt, each.groups)
        for name in sorted(bound):
            check_base_model(lora(name), families.DEFAULT.id)
        state.plans = plans
        state.loras = {name: loras[name] for name in bound}
        p.prompts = [
            remove_tags(prompt, {b.lora for b in plan.bindings})
            for prompt, plan in zip(p.prompts, plans, strict=True)
        ]
        if state.hr_plans:  # the built-in parses the hires tags after this hook: bound ones go,
            # until process_batch puts the job's hires prompts back (for the infotext)
            batch, originals = hires
            state.hr_restore = (batch, originals)
            p.all_hr_prompts[batch] = [
                remove_tags(prompt, {b.lora for b in plan.bindings})
                for prompt, plan in zip(originals, state.hr_plans, strict=True)
            ]
        state.image_bindings += [_bindings_info(plan) for plan in plans]
        # one value for the job (1.8.0's create_infotext cannot give images different values):
        # the bindings, or each image's when they differ
        same = all(b == state.image_bindings[0] for b in state.image_bindings)
        settings = state.settings
        info = (
            settings.infotext(state.image_bindings[0])
            if same
            else settings.infotext(per_image=state.image_bindings)
        )
        p.extra_generation_params[INFOTEXT_KEY] = info

    def process_batch(self, p, *args, **kwargs):
        state = getattr(p, STATE_ATTR, None)
        if state is None:
            return
        restore = getattr(state, "hr_restore", None)
        if restore is not None:  # the hires tags are parsed by now
            p.all_hr_prompts[restore[0]], state.hr_restore = restore[1], None
        from modules import sd_samplers_common

        def interrupted() -> None:
            if shared.state.interrupted or shared.state.skipped:
                raise sd_samplers_common.InterruptedException

        def progress(done: int, total: int) -> None:  # the latent updates count beside the steps
            shared.state.sampling_steps = total
            shared.state.sampling_step = done

        state.progress = progress
        state.mask_blend_args = getattr(scripts, "MaskBlendArgs", None)  # inpainting: on_mask_blend
        state.skip_early_cond = float(getattr(shared.opts, "skip_early_cond", 0.0) or 0.0)  # 1.10
        state.ngms_all_steps = bool(getattr(shared.opts, "s_min_uncond_all", False))
        # also with an error: p.sample raises it (the WebUI only logs exceptions of script hooks)
        wrap_once(p, "sample", lambda: clora_sampling(p, state, sd_samplers, interrupted))

    def postprocess(self, p, processed, *args):
        state = getattr(p, STATE_ATTR, None)
        if state is None or not state.settings.show_masks or not state.cores:
            return
        from PIL import Image

        for pixels, caption in clora_gallery(state.cores):
            processed.images.append(Image.fromarray(pixels).resize((p.width, p.height), Image.NEAREST))
            processed.infotexts.append(caption)


def _hires_batch(p):
    """``(slice, hires prompts)`` of this batch when the hires fix runs, else None."""
    if not getattr(p, "enable_hr", False) or getattr(p, "all_hr_prompts", None) is None:
        return None
    batch = slice(p.iteration * p.batch_size, (p.iteration + 1) * p.batch_size)
    return batch, list(p.all_hr_prompts[batch])


def _binds(prompt: str) -> bool:
    return bool(split_bindings(prompt)[1])


def _bindings_info(plan) -> list[dict]:
    return [
        {"lora": b.lora, "weight": b.unet, "subject": b.subject, "trigger": b.trigger} for b in plan.bindings
    ]


@contextlib.contextmanager
def _held_for_sampling(state: GenerationState):
    """Keep a hook's error on the state: A1111 logs exceptions of script hooks and carries on,
    so the error is raised again from ``p.sample``, where it stops the generation with its message."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - re-raised from p.sample
        log.error("%s", error)
        state.error = error


def _embedding_db():
    """The host's textual-inversion database (the embeddings its prompt encoder substitutes)."""
    from modules import sd_hijack

    return sd_hijack.model_hijack.embedding_db


def _tokenizer():
    from lib_loraclr.sd.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()
