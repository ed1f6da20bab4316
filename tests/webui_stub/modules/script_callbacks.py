"""Mirror of modules.script_callbacks: the registrations and runners we use, real signatures."""

from collections import defaultdict


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
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


callback_map = defaultdict(list)


def clear_callbacks():
    callback_map.clear()


def _add(kind, callback):
    callback_map[kind].append(callback)


def on_app_started(callback):
    _add("app_started", callback)


def on_ui_tabs(callback):
    _add("ui_tabs", callback)


def on_ui_settings(callback):
    _add("ui_settings", callback)


def on_script_unloaded(callback):
    _add("script_unloaded", callback)


def on_cfg_denoiser(callback):
    _add("cfg_denoiser", callback)


def on_cfg_denoised(callback):
    _add("cfg_denoised", callback)


def on_infotext_pasted(callback):
    _add("infotext_pasted", callback)


def on_model_loaded(callback):
    _add("model_loaded", callback)


def app_started_callback(demo, app):
    for c in callback_map["app_started"]:
        c(demo, app)


def ui_tabs_callback():
    res = []
    for c in callback_map["ui_tabs"]:
        res += c() or []
    return res


def ui_settings_callback():
    for c in callback_map["ui_settings"]:
        c()


def script_unloaded_callback():
    for c in reversed(callback_map["script_unloaded"]):
        c()


def cfg_denoiser_callback(params):
    for c in callback_map["cfg_denoiser"]:
        c(params)


def cfg_denoised_callback(params):
    for c in callback_map["cfg_denoised"]:
        c(params)
