"""Mirror of modules.script_callbacks (1.8.0): registrations, runners and params classes we use.

As in the real host, every runner catches a callback's exception, reports it through
``modules.errors.report`` and goes on with the next callback; entries are ``ScriptCallback(script,
callback)`` in ``callback_map['callbacks_<kind>']``, the script being the registering file.
"""

import inspect
from collections import namedtuple

from modules import errors


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x = x
        self.image_cond = image_cond
        self.sigma = sigma
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.text_cond = text_cond
        self.text_uncond = text_uncond
        self.denoiser = denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x = x
        self.sampling_step = sampling_step
        self.total_sampling_steps = total_sampling_steps


ScriptCallback = namedtuple("ScriptCallback", ["script", "callback"])
_KINDS = (
    "app_started",
    "model_loaded",
    "ui_tabs",
    "ui_train_tabs",
    "ui_settings",
    "before_image_saved",
    "image_saved",
    "extra_noise",
    "cfg_denoiser",
    "cfg_denoised",
    "cfg_after_cfg",
    "before_component",
    "after_component",
    "image_grid",
    "infotext_pasted",
    "script_unloaded",
    "before_ui",
    "on_reload",
    "list_optimizers",
    "list_unets",
    "before_token_counter",
)
callback_map = {f"callbacks_{kind}": [] for kind in _KINDS}


def report_exception(c, job):
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


def clear_callbacks():
    for callback_list in callback_map.values():
        callback_list.clear()


def add_callback(callbacks, fun):
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"
    callbacks.append(ScriptCallback(filename, fun))


def remove_current_script_callbacks():
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"
    if filename == "unknown file":
        return
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(callback_to_remove)


def remove_callbacks_for_function(callback_func):
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)


def _run(kind, *args, reverse=False):
    entries = callback_map[f"callbacks_{kind}"]
    for c in reversed(entries) if reverse else list(entries):
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, f"{kind}_callback")


def app_started_callback(demo, app):
    _run("app_started", demo, app)


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        try:
            res += c.callback() or []
        except Exception:
            report_exception(c, "ui_tabs_callback")
    return res


def ui_settings_callback():
    _run("ui_settings")


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def cfg_denoised_callback(params):
    _run("cfg_denoised", params)


def cfg_after_cfg_callback(params):
    _run("cfg_after_cfg", params)


def infotext_pasted_callback(infotext, params):
    _run("infotext_pasted", infotext, params)


def script_unloaded_callback():
    _run("script_unloaded", reverse=True)


def before_ui_callback():
    _run("before_ui", reverse=True)


def _register(kind):
    def on(callback):
        add_callback(callback_map[f"callbacks_{kind}"], callback)

    on.__name__ = f"on_{kind}"
    return on


on_app_started = _register("app_started")
on_model_loaded = _register("model_loaded")
on_ui_tabs = _register("ui_tabs")
on_ui_train_tabs = _register("ui_train_tabs")
on_ui_settings = _register("ui_settings")
on_before_image_saved = _register("before_image_saved")
on_image_saved = _register("image_saved")
on_extra_noise = _register("extra_noise")
on_cfg_denoiser = _register("cfg_denoiser")
on_cfg_denoised = _register("cfg_denoised")
on_cfg_after_cfg = _register("cfg_after_cfg")
on_infotext_pasted = _register("infotext_pasted")
on_script_unloaded = _register("script_unloaded")
on_before_ui = _register("before_ui")
on_before_reload = _register("on_reload")
