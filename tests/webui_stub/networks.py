"""Mirror of the built-in Lora extension's ``networks`` module: the LoRA list and what is loaded."""

import json
import os
import struct

import torch
from modules import shared

available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
loaded_networks = []
lora_dir = None


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.is_safetensors = filename.lower().endswith(".safetensors")
        self.metadata = _read_metadata(filename) if self.is_safetensors else {}
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.hash = None
        self.shorthash = None

    def get_alias(self):
        return self.alias


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.deltas = {}  # stand-in only: id(layer) -> the delta this network adds to its weight


_originals = {}


def network_apply_weights(module):
    """As the built-in's (called from every Linear/Conv2d forward): when the loaded networks differ
    from those the layer carries, put its backup back, add each loaded network's delta for it, and
    remember their names. A layer that carries a stale set is thus re-patched on its next forward."""
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded_networks)
    if getattr(module, "network_current_names", ()) == wanted:
        return
    backup = getattr(module, "network_weights_backup", None)
    if backup is None and wanted:
        backup = module.network_weights_backup = module.weight.detach().clone()
    with torch.no_grad():
        if backup is not None:
            module.weight.copy_(backup)
        for net in loaded_networks:
            delta = net.deltas.get(id(module))
            if delta is not None:
                module.weight += delta
    module.network_current_names = wanted


def install_forward_patches():
    """What the built-in does when it loads (lora_patches.LoraPatches): apply on every forward."""
    for cls in (torch.nn.Linear, torch.nn.Conv2d):
        original = _originals.setdefault(cls, cls.forward)

        def forward(self, input, _original=original):
            network_apply_weights(self)
            return _original(self, input)

        cls.forward = forward


def uninstall_forward_patches():
    for cls, original in _originals.items():
        cls.forward = original
    _originals.clear()


def _read_metadata(filename):
    """The safetensors header's ``__metadata__`` (as sd_models.read_metadata_from_safetensors)."""
    with open(filename, "rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        return json.loads(handle.read(size)).get("__metadata__", {}) or {}


def list_available_networks():
    """Walk ``--lora-dir`` (module ``lora_dir`` as a fallback); name = file stem, alias = ss_output_name."""
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    folder = getattr(shared.cmd_opts, "lora_dir", None) or lora_dir
    if not folder or not os.path.isdir(folder):
        return
    for root, _, files in os.walk(folder, followlinks=True):
        for file in sorted(files):
            if not file.endswith((".safetensors", ".pt", ".ckpt")):
                continue
            name = os.path.splitext(file)[0]
            entry = NetworkOnDisk(name, os.path.join(root, file))
            available_networks[name] = entry
            if entry.alias in available_network_aliases:
                forbidden_network_aliases[entry.alias.lower()] = 1
            available_network_aliases[name] = entry
            available_network_aliases[entry.alias] = entry
