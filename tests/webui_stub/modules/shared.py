"""Mirror of the parts of modules.shared we read: opts, state, cmd_opts, sd_model."""

import argparse

from modules.shared_state import State


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None, **kwargs):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.comment_after = ""

    def info(self, text):
        self.comment_after = text
        return self

    def needs_reload_ui(self):
        return self


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


opts = Options()
state = State()
cmd_opts = argparse.Namespace(ckpt_dir=None, lora_dir=None, api=True, nowebui=False)
sd_model = None
device = "cpu"
