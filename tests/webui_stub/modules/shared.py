"""Mirror of the parts of modules.shared we read: opts, state, cmd_opts, sd_model (1.8.0 names)."""

import argparse

from modules import options
from modules.shared_state import State

OptionInfo = options.OptionInfo
options_section = options.options_section

cmd_opts = argparse.Namespace(
    ckpt_dir=None,
    ckpt=None,
    lora_dir=None,
    api=True,
    nowebui=False,
    no_download_sd_model=True,
    freeze_settings=False,
    hide_ui_dir_config=False,
)
opts = options.Options(
    {
        "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
        "memmon_poll_rate": OptionInfo(0, "VRAM usage polls per second during generation"),
        "extra_networks_default_multiplier": OptionInfo(1.0, "Default multiplier for extra networks"),
    }
)
state = State()
mem_mon = None
sd_model = None
device = "cpu"
parallel_processing_allowed = True
