"""WebUI adapter for LoRACLR merging: the "LoRACLR merge" tab, its settings and the API route.

Thin by design: inputs become a :class:`~lib_loraclr.merge_request.MergeRequest`, the work is
``lib_loraclr.merge_service``; this file only talks to the WebUI (lists, progress, queue, paths).
"""

from __future__ import annotations

import contextlib
import html
import logging
import os
import shutil

import gradio as gr
from modules import call_queue, script_callbacks, sd_models, shared

import lib_loraclr.merge_request as mr
from lib_loraclr import merge_service
from lib_loraclr.errors import Interrupted, LoraClrError

log = logging.getLogger("sd-webui-loraclr")

LOADED = "(loaded model)"
METHOD_LABELS = {"LoRACLR (contrastive)": "loraclr", "Least squares": "lsq", "Naive sum": "sum", "Average": "average"}
GROUPS = {"Text encoder": "te", "Cross-attention K/V": "cross_kv", "Spatial (UNet attention)": "spatial"}
SECTION = ("loraclr", "LoRACLR / CLoRA")


def _elem(name: str) -> str:
    return f"loraclr_merge_{name}"


# -- host lookups --------------------------------------------------------------------------------
def _networks():
    import networks  # the built-in Lora extension; imported late, it is loaded after us

    return networks


def find_lora_file(name: str) -> str | None:
    return mr.find_lora_file(_networks(), name)


def lora_names() -> list[str]:
    return sorted(_networks().available_networks)


def merge_dir() -> str:
    folder = getattr(shared.cmd_opts, "loraclr_merge_dir", None) or shared.cmd_opts.ckpt_dir or sd_models.model_path
    os.makedirs(folder, exist_ok=True)
    return folder


def _checkpoint_file(base: str | None) -> tuple[str, bool]:
    """(file of the base checkpoint, whether it is the loaded one)."""
    loaded = getattr(shared.sd_model, "sd_checkpoint_info", None)
    if not base or base == LOADED:
        if loaded is None:
            raise mr.MergeRequestError("no model is loaded; pick a base checkpoint")
        return loaded.filename, True
    info = sd_models.get_closet_checkpoint_match(base)
    if info is None:
        raise mr.MergeRequestError(f"checkpoint {base!r} not found; pick one from the list (refresh after adding files)")
    return info.filename, loaded is not None and os.path.abspath(info.filename) == os.path.abspath(loaded.filename)


def _progress(done: int, total: int, label: str) -> None:
    shared.state.job_count = max(total, 1)
    shared.state.sampling_steps = max(total, 1)
    shared.state.sampling_step = done
    shared.state.textinfo = f"LoRACLR: {label}"


def _should_stop() -> bool:
    return bool(shared.state.interrupted or shared.state.skipped)


def run_merge(request: mr.MergeRequest) -> dict:
    """Do one merge for the tab or the API; the loaded model is left exactly as it was."""
    pairs = mr.resolve_loras(request, find_lora_file)
    out_path = mr.output_path(request, merge_dir())
    base_file, is_loaded = _checkpoint_file(request.base)
    options = merge_service.ServiceOptions(
        device=getattr(shared.cmd_opts, "loraclr_device", None) or getattr(shared.opts, "loraclr_device", "") or None,
    )
    with contextlib.ExitStack() as stack:
        from lib_loraclr.webui_model import WebUIModel, builtin_lora_suspended, side_model

        stack.enter_context(builtin_lora_suspended(shared.sd_model))
        sd_model = shared.sd_model
        if not is_loaded:
            from lib_loraclr.checkpoint_layout import read_state_dict

            state_dict, _ = read_state_dict(base_file)
            sd_model = stack.enter_context(side_model(shared.sd_model, state_dict, _free_memory()))
        result = merge_service.merge_to_checkpoint(
            WebUIModel(sd_model), pairs, request, base_file, out_path, options, progress=_progress, should_stop=_should_stop
        )
    config_file = os.path.splitext(base_file)[0] + ".yaml"
    merged_config = os.path.splitext(result["path"])[0] + ".yaml"
    if os.path.exists(config_file) and not os.path.exists(merged_config):
        shutil.copyfile(config_file, merged_config)  # a base with its own config needs it beside the merge too
    sd_models.list_models()
    title = next((i.title for i in sd_models.checkpoints_list.values() if os.path.abspath(i.filename) == os.path.abspath(result["path"])), None)
    result["checkpoint_title"] = title or os.path.basename(result["path"])
    return result


def _free_memory() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


# -- the tab --------------------------------------------------------------------------------------
def _concept_rows(tags_text: str, rows) -> list[list]:
    """Rows for the concept table from pasted tags, keeping trigger texts the user already edited."""
    existing = {r[0]: r for r in (rows or []) if r and r[0]}
    out = []
    for choice in mr.parse_lora_tags(tags_text):
        if choice.name in existing:
            out.append([choice.name, choice.weight, existing[choice.name][2]])
            continue
        out.append([choice.name, choice.weight, merge_service.default_concept(find_lora_file(choice.name), choice.name)])
    return out


def _report_html(result: dict) -> str:
    return merge_service.report_html(result.get("report", {}))


def _merge_from_ui(base, rows, method_label, groups, iterations, lr, margin, lambda_delta, lambda_mse, seed, steps,
                   resolution, lsq_init, output_name, overwrite, dtype, lora_rank):  # fmt: skip
    choices = [
        mr.LoraChoice(str(r[0]).strip(), float(r[1] if r[1] not in (None, "") else 1.0), str(r[2] or "").strip() or None)
        for r in (rows.values.tolist() if hasattr(rows, "values") else rows or [])
        if r and str(r[0]).strip()
    ]
    try:
        request = mr.build_request(
            choices, output_name, base=None if base == LOADED else base, method=METHOD_LABELS.get(method_label, "loraclr"),
            overwrite=overwrite, dtype=dtype, lora_rank=int(lora_rank),
            params={"iterations": iterations, "lr": lr, "margin": margin, "lambda_delta": lambda_delta, "lambda_mse": lambda_mse,
                    "seed": seed, "steps": steps, "resolution": resolution, "lsq_init": bool(lsq_init),
                    "groups": [GROUPS[g] for g in groups]},
        )  # fmt: skip
        result = run_merge(request)
    except Interrupted:
        return "<p>Merge interrupted; nothing was written and the loaded model is unchanged.</p>", "", gr.update()
    except LoraClrError as error:
        return f"<p class='error'>{html.escape(str(error))}</p>", "", gr.update()
    message = f"<p>Saved <b>{html.escape(result['checkpoint_title'])}</b> to {html.escape(result['path'])}"
    if result.get("lora_path"):
        message += f"<br>LoRA export: {html.escape(result['lora_path'])}"
    message += "</p>"
    return message + _report_html(result), result["checkpoint_title"], gr.update(choices=[LOADED, *sd_models.checkpoint_tiles()])


def _load_now(title: str) -> str:
    info = sd_models.get_closet_checkpoint_match(title) if title else None
    if info is None:
        return "<p class='error'>Nothing to load yet: run a merge first.</p>"
    sd_models.reload_model_weights(info=info)
    shared.opts.sd_model_checkpoint = info.title
    return f"<p>Loaded {html.escape(info.title)}.</p>"


def on_ui_tabs():
    defaults = merge_service.MERGE_DEFAULTS
    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            base = gr.Dropdown(label="Base checkpoint", choices=[LOADED, *sd_models.checkpoint_tiles()], value=LOADED, elem_id=_elem("base"))
            refresh = gr.Button(value="\U0001f504", elem_id=_elem("refresh"), scale=0)
        with gr.Row():
            picker = gr.Dropdown(label="Add LoRA", choices=lora_names(), multiselect=True, elem_id=_elem("picker"))
            tags = gr.Textbox(label="LoRAs as <lora:NAME:WEIGHT> (paste from a prompt)", lines=2, elem_id=_elem("tags"))
        concepts = gr.Dataframe(
            headers=["LoRA", "weight", "concept / trigger text"], datatype=["str", "number", "str"], col_count=(3, "fixed"),
            row_count=(0, "dynamic"), interactive=True, label="Concepts (trigger text pre-filled from the LoRA's activation text)",
            elem_id=_elem("concepts"),
        )  # fmt: skip
        method = gr.Radio(label="Method", choices=list(METHOD_LABELS), value="LoRACLR (contrastive)", elem_id=_elem("method"))
        with gr.Accordion("Advanced (paper defaults)", open=False):
            groups = gr.CheckboxGroup(label="Layer groups", choices=list(GROUPS), value=list(GROUPS), elem_id=_elem("groups"))
            with gr.Row():
                iterations = gr.Number(label="Iterations", value=defaults["iterations"], precision=0, elem_id=_elem("iterations"))
                lr = gr.Number(label="Learning rate", value=defaults["lr"], elem_id=_elem("lr"))
                margin = gr.Number(label="Margin", value=defaults["margin"], elem_id=_elem("margin"))
            with gr.Row():
                lambda_delta = gr.Number(label="lambda_delta", value=defaults["lambda_delta"], elem_id=_elem("lambda_delta"))
                lambda_mse = gr.Number(label="lambda_mse", value=defaults["lambda_mse"], elem_id=_elem("lambda_mse"))
                seed = gr.Number(label="Seed", value=defaults["seed"], precision=0, elem_id=_elem("seed"))
            with gr.Row():
                steps = gr.Number(label="Sampling steps for features", value=defaults["steps"], precision=0, elem_id=_elem("steps"))
                resolution = gr.Number(label="Feature resolution", value=defaults["resolution"], precision=0, elem_id=_elem("resolution"))
                lsq_init = gr.Checkbox(label="Start from the least-squares fusion", value=defaults["lsq_init"], elem_id=_elem("lsq_init"))
        with gr.Row():
            output_name = gr.Textbox(label="Output name (.safetensors)", value="loraclr_merge", elem_id=_elem("output_name"))
            overwrite = gr.Checkbox(label="Overwrite", value=False, elem_id=_elem("overwrite"))
            dtype = gr.Radio(label="Precision", choices=["fp16", "fp32"], value=getattr(shared.cmd_opts, "loraclr_dtype", None) or "fp16",
                             elem_id=_elem("dtype"))  # fmt: skip
            lora_rank = gr.Slider(label="Also save as LoRA (rank; 0 = no)", minimum=0, maximum=256, step=1, value=0, elem_id=_elem("lora_rank"))
        with gr.Row():
            run = gr.Button("Merge", variant="primary", elem_id=_elem("run"))
            load = gr.Button("Load it now", elem_id=_elem("load"))
        result_title = gr.Textbox(visible=False, elem_id=_elem("result_title"))
        status = gr.HTML(elem_id=_elem("status"))

        picker.change(lambda names, text: (text or "") + "".join(f" <lora:{n}:1>" for n in names or [] if f"<lora:{n}:" not in (text or "")),
                      inputs=[picker, tags], outputs=[tags])  # fmt: skip
        tags.change(_concept_rows, inputs=[tags, concepts], outputs=[concepts])
        refresh.click(lambda: (sd_models.list_models(), gr.update(choices=[LOADED, *sd_models.checkpoint_tiles()]))[1], outputs=[base])
        run.click(
            call_queue.wrap_gradio_gpu_call(_merge_from_ui, extra_outputs=[gr.update(), gr.update()]),
            inputs=[base, concepts, method, groups, iterations, lr, margin, lambda_delta, lambda_mse, seed, steps, resolution,
                    lsq_init, output_name, overwrite, dtype, lora_rank],
            outputs=[status, result_title, base],
        )  # fmt: skip
        load.click(call_queue.wrap_gradio_gpu_call(_load_now, extra_outputs=[]), inputs=[result_title], outputs=[status])
    return [(tab, "LoRACLR merge", "loraclr_merge")]


def on_ui_settings():
    options = {
        "loraclr_device": shared.OptionInfo("", "LoRACLR: device for the merge optimiser (empty = the WebUI's device)", section=SECTION),
        "loraclr_default_method": shared.OptionInfo("loraclr", "LoRACLR: default merge method", gr.Radio,
                                                    {"choices": list(mr.METHODS)}, section=SECTION),  # fmt: skip
        "loraclr_clora_show_masks": shared.OptionInfo(False, "CLoRA: add attention masks to the gallery by default", section=SECTION),
    }
    for key, info in options.items():
        shared.opts.add_option(key, info)


def on_app_started(_demo, app):
    from fastapi import Body, HTTPException

    @app.get("/loraclr/v1/health")
    def health() -> dict:
        from lib_loraclr import __version__

        return {"ok": True, "version": __version__, "methods": list(mr.METHODS)}

    @app.post("/loraclr/v1/merge")
    def merge(body: dict = Body(...)) -> dict:  # noqa: B008 - FastAPI's idiom
        try:
            request = mr.build_request(
                body.get("loras") or [], body.get("output_name") or "", base=body.get("base"), method=body.get("method", "loraclr"),
                overwrite=bool(body.get("overwrite", False)), dtype=body.get("dtype", "fp16"), lora_rank=int(body.get("lora_rank", 0) or 0),
                params=body.get("params") or {},
            )  # fmt: skip
            with call_queue.queue_lock:
                shared.state.begin(job="loraclr_merge")
                try:
                    result = run_merge(request)
                finally:
                    shared.state.end()
        except mr.MergeRequestError as error:
            status = 409 if "already exists" in str(error) else 404 if "not found" in str(error) else 400
            raise HTTPException(status_code=status, detail=str(error)) from None
        except Interrupted:
            raise HTTPException(status_code=409, detail="interrupted; nothing was written") from None
        except LoraClrError as error:
            raise HTTPException(status_code=400, detail=str(error)) from None
        return result


script_callbacks.on_ui_tabs(on_ui_tabs)
script_callbacks.on_ui_settings(on_ui_settings)
script_callbacks.on_app_started(on_app_started)
