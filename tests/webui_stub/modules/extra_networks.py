"""Mirror of modules.extra_networks: ``<name:args>`` tags taken out of prompts."""

import re
from collections import defaultdict

re_extra_net = re.compile(r"<(\w+):([^>]+)>")


class ExtraNetworkParams:
    def __init__(self, items=None):
        self.items = items or []
        self.positional = []
        self.named = {}
        for item in self.items:
            parts = item.split("=", 2) if isinstance(item, str) else [item]
            if len(parts) == 2:
                self.named[parts[0]] = parts[1]
            else:
                self.positional.append(item)


def parse_prompt(prompt):
    res = defaultdict(list)

    def found(m):
        res[m.group(1)].append(ExtraNetworkParams(items=m.group(2).split(":")))
        return ""

    prompt = re.sub(re_extra_net, found, prompt)
    return prompt, res


def parse_prompts(prompts):
    res = []
    extra_data = None
    for prompt in prompts:
        updated_prompt, parsed_extra_networks = parse_prompt(prompt)
        if extra_data is None:
            extra_data = parsed_extra_networks
        res.append(updated_prompt)
    return res, extra_data


def activate(p, extra_network_data):
    """The built-in Lora activates from the parsed tags; the stand-in records what it would load."""
    import networks

    networks.loaded_networks.clear()
    for params in extra_network_data.get("lora", []):
        name = params.positional[0]
        entry = networks.available_networks.get(name)
        if entry is not None:
            net = networks.Network(name, entry)
            if len(params.positional) > 1:
                net.te_multiplier = net.unet_multiplier = float(params.positional[1])
            networks.loaded_networks.append(net)
