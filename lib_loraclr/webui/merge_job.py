"""One merge job inside the WebUI, shared by the tab and the API route.

The host's modules arrive in a :class:`WebUIHost` (so this file never imports ``modules``):
the request is resolved against the WebUI's LoRA and checkpoint lists, merged on the loaded
model (or on a side copy for another base), written into the checkpoint folder, and the
WebUI's list is refreshed so the result is selectable at once. The loaded model's weights are
byte-identical afterwards, also after an error or an interrupt: the engines only read weights
(routing and feature capture are hooks removed in ``finally``) and the built-in Lora's in-place
patches are put back by :func:`~lib_loraclr.webui.model.builtin_lora_suspended`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from lib_loraclr.merge import request as mr
from lib_loraclr.merge import service as merge_service
from lib_loraclr.webui import host as hs

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebUIHost:
    """The WebUI objects a merge needs, passed in by the script (``modules.shared`` etc.)."""

    shared: Any  # opts, cmd_opts, state, sd_model
    sd_models: Any  # checkpoints_list, list_models(), get_closet_checkpoint_match(), model_path
    networks: Any  # the built-in Lora extension: available_networks, available_network_aliases

    def option(self, key: str, default: Any = None) -> Any:
        """A ``loraclr_*`` setting (its default before ``on_ui_settings`` ran)."""
        try:
            value = getattr(self.shared.opts, key)
        except AttributeError:
            return default
        return default if value is None else value

    def default_method(self) -> str:
        return self.option("loraclr_default_method", "loraclr")

    def default_dtype(self) -> str:
        """``--loraclr-dtype`` wins over the setting."""
        return getattr(self.shared.cmd_opts, "loraclr_dtype", None) or self.option(
            "loraclr_default_dtype", "fp16"
        )


def service_options(webui: WebUIHost) -> merge_service.ServiceOptions:
    cmd_opts = webui.shared.cmd_opts
    device = getattr(cmd_opts, "loraclr_device", None) or webui.option("loraclr_device", "") or None
    return merge_service.ServiceOptions(
        device=device,
        compare_methods=bool(webui.option("loraclr_compare_methods", True)),
        lora_dir=hs.lora_folder(cmd_opts, webui.networks),
    )


def run_merge(request: mr.MergeRequest, webui: WebUIHost) -> dict[str, Any]:
    """Resolve, merge, write, refresh the list. Returns the API's response dict.

    Raises :class:`~lib_loraclr.merge.request.MergeRequestError` (with an HTTP ``status``) for
    bad names/outputs, :class:`~lib_loraclr.errors.Interrupted` on Interrupt/Skip, and other
    :class:`~lib_loraclr.errors.LoraClrError` for files or models that do not fit.
    """
    from lib_loraclr.webui.model import WebUIModel, builtin_lora_suspended, side_model

    shared, sd_models = webui.shared, webui.sd_models
    pairs = mr.resolve_loras(request, lambda name: hs.find_lora_file(webui.networks, name))
    base = hs.resolve_base(sd_models, shared.sd_model, request.base)
    if request.estimate:  # every SD1.x checkpoint has the loaded model's shapes
        return merge_service.estimate(WebUIModel(shared.sd_model), pairs, request, service_options(webui))
    if not str(base.filename).lower().endswith(".safetensors"):
        raise mr.MergeRequestError(
            f"the base {base.title} is not a .safetensors file; the merge is written by copying the base's tensors "
            "from a .safetensors file. Save it as .safetensors first (Checkpoint Merger tab: primary model only, "
            "multiplier 0, format safetensors) or pick a .safetensors base"
        )
    folder = hs.merge_folder(shared.cmd_opts, shared.opts, sd_models.model_path)
    out_path = mr.output_path(request, folder)
    progress = hs.StateProgress(shared.state)
    progress(0, 1, "loading LoRAs")
    with contextlib.ExitStack() as stack:
        loaded = shared.sd_model
        stack.enter_context(builtin_lora_suspended(loaded, webui.networks))
        model = loaded
        if not base.is_loaded:
            from lib_loraclr.sd.checkpoint import read_state_dict

            progress(0, 1, f"reading {base.title}")
            state_dict, _ = read_state_dict(base.filename)
            model = stack.enter_context(side_model(loaded, state_dict, _free_memory()))
            del state_dict
        result = merge_service.merge_to_checkpoint(
            WebUIModel(model),
            pairs,
            request,
            base.filename,
            out_path,
            service_options(webui),
            progress=progress,
            should_stop=progress.should_stop,
        )
    hs.copy_config_beside(base.filename, result["path"])
    sd_models.list_models()
    if result.get("lora_path") and hasattr(webui.networks, "list_available_networks"):
        webui.networks.list_available_networks()  # the export is a <lora:...> at once
    title = hs.checkpoint_title_for(sd_models, result["path"])
    if title is None:
        log.warning("%s is outside the WebUI's checkpoint folders, so it is not listed", result["path"])
    result["checkpoint_title"] = title or ""
    result["base"] = base.title
    return result


def _free_memory() -> int | None:
    """Free RAM for the side copy of the model (psutil ships with the WebUI; absent: no check)."""
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)
