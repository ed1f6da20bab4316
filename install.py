"""Run by the WebUI's launcher: install only what is missing.

Inside the WebUI everything we need ships with it (torch, safetensors, numpy, einops, gradio); the
standalone CLI's diffusers runtime is never needed here, so normally this installs nothing.
"""

import launch

REQUIRED = {"safetensors": "safetensors>=0.4", "einops": "einops", "numpy": "numpy"}

for module, requirement in REQUIRED.items():
    if not launch.is_installed(module):
        launch.run_pip(f"install {requirement}", f"sd-webui-loraclr requirement: {requirement}")
