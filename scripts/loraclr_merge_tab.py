"""The "LoRACLR merge" tab: pick LoRAs, merge them into a checkpoint, read the fidelity report.

Thin by design: :class:`MergeTab` owns the components and turns their values into one
:class:`~lib_loraclr.webui.merge_form.MergeForm`; the work is ``lib_loraclr.webui.merge_job.run_merge`` (shared with the API).
The click runs through ``call_queue.wrap_gradio_gpu_call`` with a ``task(...)`` id made by
``javascript/loraclr.js``, so the WebUI's progress bar and Interrupt work as on txt2img (a merge is one job, so there is
no Skip button; the API's ``/sdapi/v1/skip`` stops it as Interrupt does).
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr
from modules import call_queue, script_callbacks, sd_models, shared
from modules.ui_components import FormRow, ToolButton

from lib_loraclr.errors import Interrupted, LoraClrError
from lib_loraclr.merge import request as mr
from lib_loraclr.merge.engine import MergeConfig
from lib_loraclr.merge.options import DTYPES
from lib_loraclr.merge.service import plan_html, report_html
from lib_loraclr.webui import host as hs
from lib_loraclr.webui.merge_form import (
    ADVANCED,
    CONCEPT_HEADERS,
    GROUP_LABELS,
    INTEGER_PARAMS,
    METHOD_LABELS,
    MergeForm,
    method_label,
)
from lib_loraclr.webui.merge_job import WebUIHost, run_merge


def elem_id(name: str) -> str:
    return f"loraclr_merge_{name}"


def _webui() -> WebUIHost:
    import networks  # the built-in Lora extension's module; loaded after extensions' scripts

    return WebUIHost(shared, sd_models, networks)


def _base_choices() -> list[str]:
    return [hs.LOADED, *sd_models.checkpoint_tiles()]


def merge_clicked(id_task: str, *values: Any) -> tuple[Any, str, str]:
    """The Merge button (queued). Returns (base dropdown update, merged title, status HTML last)."""
    inputs = MergeForm(*values)
    try:
        result = run_merge(inputs.request(), _webui())
    except Interrupted:
        return (
            gr.update(),
            "",
            "<p class='loraclr-note'>Merge interrupted; nothing was written and the loaded model is unchanged.</p>",
        )
    except LoraClrError as error:
        return gr.update(), "", f"<p class='loraclr-error'>{html.escape(str(error))}</p>"
    title = result["checkpoint_title"]
    message = f"<p>Saved <b>{html.escape(title or result['path'])}</b> to {html.escape(result['path'])}"
    if result.get("lora_path"):
        message += f"<br>LoRA export: {html.escape(result['lora_path'])}"
    if not title:
        message += (
            "<br>This folder is outside the WebUI's checkpoint folders, so the merge is not in the list."
        )
    message += "</p>"
    plan = (result.get("report", {}).get("methods", {}).get(result["method"]) or {}).get("memory_plan")
    return (
        gr.update(choices=_base_choices()),
        title,
        message + (plan_html(plan) if plan else "") + report_html(result.get("report", {})),
    )


def estimate_clicked(*values: Any) -> str:
    """The Estimate button: the merge's memory plan for these inputs, nothing merged."""
    try:
        result = run_merge(MergeForm(*values).request(estimate=True), _webui())
    except LoraClrError as error:
        return f"<p class='loraclr-error'>{html.escape(str(error))}</p>"
    return plan_html(result["estimate"])


def load_clicked(title: str) -> str:
    """'Load it now': the JS switches the checkpoint selector (selectCheckpoint); this says what happens."""
    info = sd_models.get_closet_checkpoint_match(title) if title else None
    if info is None:
        return "<p class='loraclr-error'>Nothing to load yet: run a merge first.</p>"
    return f"<p>Loading {html.escape(info.title)} (see the checkpoint selector at the top).</p>"


def tags_changed(tags_text: str, rows: Any) -> tuple[Any, str]:
    """Pasted ``<lora:...>`` tags -> concept rows (edited concept texts are kept)."""
    current = rows.values.tolist() if hasattr(rows, "values") else rows
    try:
        new_rows = hs.rows_from_tags(_webui().networks, tags_text, current)
    except mr.MergeRequestError as error:
        return gr.update(), f"<p class='loraclr-error'>{html.escape(str(error))}</p>"
    return (new_rows or [["", 1.0, ""]]), ""


def lora_picked(name: str | None, tags_text: str) -> tuple[str, None]:
    """A LoRA from the picker is appended as the Lora tab's card would write it."""
    text = tags_text or ""
    if name and f"<lora:{name}:" not in text and f"<lora:{name}>" not in text:
        weight = float(getattr(shared.opts, "extra_networks_default_multiplier", 1.0) or 1.0)
        text = f"{text} {hs.lora_tag(_webui().networks, name, weight)}".strip()
    return text, None


def refreshed() -> tuple[Any, Any]:
    sd_models.list_models()
    nets = _webui().networks
    if hasattr(nets, "list_available_networks"):
        nets.list_available_networks()
    return gr.update(choices=_base_choices()), gr.update(choices=hs.lora_names(nets))


class MergeTab:
    """Owns the tab's components; :attr:`inputs` follows :class:`~lib_loraclr.webui.merge_form.MergeForm` field for field."""

    def __init__(self) -> None:
        webui = _webui()
        defaults = MergeConfig()
        method, dtype = webui.default_method(), webui.default_dtype()
        c: dict[str, Any] = {}
        with gr.Blocks(analytics_enabled=False) as self.blocks:
            self.id_task = gr.Textbox(visible=False, elem_id=elem_id("id_task"))
            with FormRow():
                c["base"] = gr.Dropdown(
                    label="Base checkpoint", choices=_base_choices(), value=hs.LOADED, elem_id=elem_id("base")
                )
                self.refresh = ToolButton(value="\U0001f504", elem_id=elem_id("refresh"))
            with FormRow():
                self.picker = gr.Dropdown(
                    label="Add LoRA", choices=hs.lora_names(webui.networks), elem_id=elem_id("picker")
                )
                self.tags = gr.Textbox(
                    label="LoRAs as <lora:NAME:WEIGHT> (paste from a prompt)",
                    lines=2,
                    elem_id=elem_id("tags"),
                )
            c["concepts"] = gr.Dataframe(
                headers=CONCEPT_HEADERS,
                datatype=["str", "number", "str"],
                col_count=(3, "fixed"),
                row_count=(1, "dynamic"),
                value=[["", 1.0, ""]],
                interactive=True,
                elem_id=elem_id("concepts"),
                label="Concepts: one row per LoRA; the concept text is pre-filled from its activation text (editable)",
            )
            c["method"] = gr.Radio(
                label="Method",
                choices=list(METHOD_LABELS),
                value=method_label(method),
                elem_id=elem_id("method"),
            )
            with gr.Accordion("Advanced (the paper's defaults)", open=False):
                with FormRow():
                    c["groups"] = gr.CheckboxGroup(
                        label="Layer groups merged by the method",
                        choices=list(GROUP_LABELS),
                        value=list(GROUP_LABELS),
                        elem_id=elem_id("groups"),
                    )
                    c["lsq_init"] = gr.Checkbox(
                        label="Start from the least-squares fusion",
                        value=defaults.lsq_init,
                        elem_id=elem_id("lsq_init"),
                    )
                c["max_memory"] = gr.Textbox(
                    label="Memory limit for the merge (e.g. 20GiB; empty: the merge device's free memory less 10%)",
                    value="",
                    elem_id=elem_id("max_memory"),
                )
                for row in (ADVANCED[:4], ADVANCED[4:8], ADVANCED[8:]):
                    with FormRow():
                        for key in row:
                            c[key] = gr.Number(
                                label=key,
                                value=getattr(defaults, key),
                                precision=0 if key in INTEGER_PARAMS else None,
                                elem_id=elem_id(key),
                            )
            with FormRow():
                c["output_name"] = gr.Textbox(
                    label="Output name (.safetensors)", value="loraclr_merge", elem_id=elem_id("output_name")
                )
                c["overwrite"] = gr.Checkbox(label="Overwrite", value=False, elem_id=elem_id("overwrite"))
                c["dtype"] = gr.Radio(
                    label="Precision", choices=list(DTYPES), value=dtype, elem_id=elem_id("dtype")
                )
                c["lora_rank"] = gr.Slider(
                    label="Also save as LoRA (rank; 0 = no)",
                    minimum=0,
                    maximum=256,
                    step=1,
                    value=0,
                    elem_id=elem_id("lora_rank"),
                )
            with FormRow():
                self.run = gr.Button("Merge", variant="primary", elem_id=elem_id("run"))
                self.estimate = gr.Button("Estimate memory", elem_id=elem_id("estimate"))
                self.interrupt = gr.Button("Interrupt", elem_id=elem_id("interrupt"))
                self.load = gr.Button("Load it now", elem_id=elem_id("load"))
            self.result_title = gr.Textbox(visible=False, elem_id=elem_id("result_title"))
            with gr.Group(elem_id=elem_id("results_panel")):
                self.status = gr.HTML(elem_id=elem_id("status"))
        self.components = c
        self.inputs = [c[name] for name in MergeForm.names()]
        self._wire()

    def _wire(self) -> None:
        c = self.components
        with self.blocks:
            self.picker.change(lora_picked, inputs=[self.picker, self.tags], outputs=[self.tags, self.picker])
            self.tags.change(
                tags_changed, inputs=[self.tags, c["concepts"]], outputs=[c["concepts"], self.status]
            )
            self.refresh.click(refreshed, outputs=[c["base"], self.picker])
            self.run.click(
                call_queue.wrap_gradio_gpu_call(merge_clicked, extra_outputs=[gr.update(), ""]),
                _js="loraclr_merge_submit",
                inputs=[self.id_task, *self.inputs],
                outputs=[c["base"], self.result_title, self.status],
            )
            self.estimate.click(estimate_clicked, inputs=self.inputs, outputs=[self.status])
            self.interrupt.click(fn=lambda: shared.state.interrupt(), inputs=[], outputs=[])
            self.load.click(
                load_clicked, _js="loraclr_load_merged", inputs=[self.result_title], outputs=[self.status]
            )


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    return [(MergeTab().blocks, "LoRACLR merge", "loraclr_merge")]


script_callbacks.on_ui_tabs(on_ui_tabs)
