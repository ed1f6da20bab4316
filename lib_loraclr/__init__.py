"""LoRACLR merging and CLoRA composition of several LoRAs, independent of any WebUI.

Nothing in this package imports the WebUI's ``modules`` or ``gradio``: the WebUI adapters in
``scripts/`` hand plain objects (modules, tensors, callables) to the functions here.
"""

from __future__ import annotations

__version__ = "0.1.0"
