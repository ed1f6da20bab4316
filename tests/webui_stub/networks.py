"""Mirror of the built-in Lora extension's ``networks`` module: the LoRA list and what is loaded."""

import json
import os
import struct

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
