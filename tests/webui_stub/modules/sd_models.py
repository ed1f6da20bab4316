"""Mirror of modules.sd_models (1.8.0): the checkpoint list (titles, aliases), its rescan and lookups.

Simplified: hashes come only from ``calculate_shorthash()`` (the real host reads a cache first),
and ``reload_model_weights`` records the switch instead of loading weights.
"""

import hashlib
import os
import re

from modules import paths, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))
checkpoints_list = {}
checkpoint_aliases = {}
re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")
reloads = []  # CheckpointInfo passed to reload_model_weights, for tests


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = (
            os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        )
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        if name.startswith(("\\", "/")):
            name = name[1:]
        self.metadata = {}
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = None
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra
        self.ids = [
            self.hash,
            self.model_name,
            self.title,
            name,
            self.name_for_extra,
            f"{name} [{self.hash}]",
        ]

    def register(self):
        checkpoints_list[self.title] = self
        for id_ in self.ids:
            checkpoint_aliases[id_] = self

    def calculate_shorthash(self):
        with open(self.filename, "rb") as handle:
            self.sha256 = hashlib.sha256(handle.read()).hexdigest()
        self.shorthash = self.sha256[:10]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        self.ids += [self.shorthash, self.sha256, self.title, self.short_title]
        checkpoints_list.pop(old_title, None)
        self.register()
        return self.shorthash


def model_hash(filename):
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def _scan(folder):
    if not folder or not os.path.isdir(folder):
        return []
    found = []
    for root, _, files in os.walk(folder, followlinks=True):
        for file in sorted(files):
            if file.endswith((".ckpt", ".safetensors")) and not file.endswith(
                (".vae.ckpt", ".vae.safetensors")
            ):
                found.append(os.path.abspath(os.path.join(root, file)))
    return found


def list_models():
    """Rescan ``models/Stable-diffusion`` and ``--ckpt-dir`` (modelloader.load_models walks both)."""
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    seen = set()
    for filename in _scan(model_path) + _scan(shared.cmd_opts.ckpt_dir):
        if filename in seen:
            continue
        seen.add(filename)
        CheckpointInfo(filename).register()


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted(
        [info for info in checkpoints_list.values() if search_string in info.title],
        key=lambda x: len(x.title),
    )
    if found:
        return found[0]
    stripped = re.sub(re_strip_checksum, "", search_string)
    found = sorted(
        [info for info in checkpoints_list.values() if stripped in info.title], key=lambda x: len(x.title)
    )
    return found[0] if found else None


def select_checkpoint():
    info = checkpoint_aliases.get(shared.opts.sd_model_checkpoint)
    if info is not None:
        return info
    if not checkpoints_list:
        raise FileNotFoundError("No checkpoints found")
    return next(iter(checkpoints_list.values()))


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    info = info or select_checkpoint()
    reloads.append(info)
    return shared.sd_model
