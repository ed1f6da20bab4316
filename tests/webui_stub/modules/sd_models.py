"""Mirror of modules.sd_models: the checkpoint list (title, filename, short hash) and its rescan."""

import hashlib
import os

from modules import paths, shared

checkpoints_list = {}
checkpoint_aliases = {}
model_path = os.path.join(paths.models_path, "Stable-diffusion")


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        base = shared.cmd_opts.ckpt_dir or model_path
        name = os.path.relpath(filename, base) if filename.startswith(os.path.abspath(base)) else os.path.basename(filename)
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = name
        self.metadata = {}

    def calculate_shorthash(self):
        with open(self.filename, "rb") as handle:
            self.sha256 = hashlib.sha256(handle.read()).hexdigest()
        self.shorthash = self.sha256[:10]
        self.title = f"{self.name} [{self.shorthash}]"
        return self.shorthash

    def register(self):
        checkpoints_list[self.title] = self
        for alias in (self.name, self.model_name, self.title):
            checkpoint_aliases[alias] = self


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    base = shared.cmd_opts.ckpt_dir or model_path
    if not os.path.isdir(base):
        return
    for root, _, files in os.walk(base):
        for file in sorted(files):
            if file.endswith((".safetensors", ".ckpt")):
                info = CheckpointInfo(os.path.abspath(os.path.join(root, file)))
                info.register()


def checkpoint_tiles(use_short=False):
    return [info.title for info in checkpoints_list.values()]


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted([info for info in checkpoints_list.values() if search_string in info.title], key=lambda x: len(x.title))
    return found[0] if found else None


def reload_model_weights(sd_model=None, info=None):
    shared.opts.sd_model_checkpoint = info.title if info else None
    return shared.sd_model
