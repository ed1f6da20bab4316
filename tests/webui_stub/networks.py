"""Mirror of the built-in Lora extension's ``networks`` module: the LoRA list and what is loaded."""

import os

available_networks = {}
available_network_aliases = {}
loaded_networks = []
lora_dir = None


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.metadata = {}
        self.is_safetensors = filename.lower().endswith(".safetensors")
        self.alias = name
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


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    if not lora_dir or not os.path.isdir(lora_dir):
        return
    for file in sorted(os.listdir(lora_dir)):
        if file.endswith((".safetensors", ".pt", ".ckpt")):
            name = os.path.splitext(file)[0]
            entry = NetworkOnDisk(name, os.path.join(lora_dir, file))
            available_networks[name] = entry
            available_network_aliases[name] = entry
            available_network_aliases[entry.alias] = entry
