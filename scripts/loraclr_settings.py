"""Settings > LoRACLR: defaults of the merge tab and CLoRA (every key prefixed ``loraclr_``).

Command-line flags from ``preload.py`` win over these (``--loraclr-merge-dir``, ``--loraclr-device``,
``--loraclr-dtype``); the core never reads ``shared.opts`` itself.
"""

from __future__ import annotations

import gradio as gr
from modules import script_callbacks, shared

from lib_loraclr.merge.options import DTYPES, METHODS

SECTION = ("loraclr", "LoRACLR / CLoRA")


def options() -> dict:
    return {
        "loraclr_default_method": shared.OptionInfo(
            "loraclr", "Merge tab: default method", gr.Radio, {"choices": list(METHODS)}
        ),
        "loraclr_default_dtype": shared.OptionInfo(
            "fp16", "Merge tab: default precision of saved merges", gr.Radio, {"choices": list(DTYPES)}
        ).info("--loraclr-dtype overrides"),
        "loraclr_merge_dir": shared.OptionInfo(
            "", "Folder for merges (empty: the checkpoint folder, --ckpt-dir if set)"
        ).info(
            "use a folder inside the checkpoint folder, or merges are not listed; --loraclr-merge-dir overrides"
        ),
        "loraclr_device": shared.OptionInfo(
            "", "Device for the merge optimiser (empty: where the model is)"
        ).info("e.g. cuda, cuda:1, cpu; --loraclr-device overrides"),
        "loraclr_compare_methods": shared.OptionInfo(
            True, "Merge report: also score the other methods on the same statistics"
        ).info("a few seconds more; shows what LoRACLR gains over a plain sum"),
        "loraclr_clora_show_masks": shared.OptionInfo(
            False, "CLoRA: add the attention masks to the gallery by default"
        ),
    }


def on_ui_settings() -> None:
    for key, info in shared.options_section(SECTION, options()).items():
        shared.opts.add_option(key, info)


script_callbacks.on_ui_settings(on_ui_settings)
