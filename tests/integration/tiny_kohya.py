"""Write small kohya-format LoRAs that fit whatever SD1.x checkpoint the real-host tests run.

The real-host tests use a tiny random-weight checkpoint in the ldm layout (any width), so the
LoRAs must be derived from that checkpoint's own shapes rather than from SD1.5's. Only the
attention projections are targeted (UNet attn1/attn2 q/k/v/out and the text encoder's
self-attention), which is what LoRACLR merges and CLoRA routes; the names follow kohya's
`lora_unet_<diffusers path>` / `lora_te_text_model_<transformers path>` convention, exactly what
A1111's built-in Lora extension maps back onto the ldm modules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_UNET_ATTN = re.compile(
    r"^model\.diffusion_model\.(input_blocks|middle_block|output_blocks)\.?(\d*)\.1\."
    r"transformer_blocks\.0\.(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)\.weight$"
)
_TE_ATTN = re.compile(
    r"^cond_stage_model\.transformer\.(?:text_model\.)?encoder\.layers\.(\d+)\."
    r"self_attn\.(q_proj|k_proj|v_proj|out_proj)\.weight$"
)


def _unet_block(kind: str, index: str) -> str:
    """ldm block index -> diffusers block path (SD1.x: attention in input blocks 1,2,4,5,7,8)."""
    if kind == "middle_block":
        return "mid_block_attentions_0"
    n = int(index)
    if kind == "input_blocks":
        return f"down_blocks_{(n - 1) // 3}_attentions_{(n - 1) % 3}"
    return f"up_blocks_{n // 3}_attentions_{n % 3}"


def kohya_attention_layers(checkpoint: Path) -> dict[str, tuple[int, int]]:
    """Map kohya module name -> (out_features, in_features) for the checkpoint's attention layers."""
    layers: dict[str, tuple[int, int]] = {}
    with safe_open(str(checkpoint), framework="pt") as f:
        for key in f.keys():
            m = _UNET_ATTN.match(key)
            if m:
                kind, index, attn, proj = m.groups()
                name = f"lora_unet_{_unet_block(kind, index)}_transformer_blocks_0_{attn}_{proj.replace('.', '_')}"
            else:
                m = _TE_ATTN.match(key)
                if not m:
                    continue
                name = f"lora_te_text_model_encoder_layers_{m.group(1)}_self_attn_{m.group(2)}"
            shape = f.get_slice(key).get_shape()
            layers[name] = (int(shape[0]), int(shape[1]))
    if not layers:
        raise ValueError(
            f"{checkpoint}: no SD1.x attention layers found (is it an ldm-layout SD1 checkpoint?)"
        )
    return layers


def write_tiny_lora(
    checkpoint: Path, out: Path, *, seed: int, rank: int = 4, strength: float = 0.5, activation_text: str = ""
) -> Path:
    """Write a random rank-`rank` kohya LoRA for `checkpoint` to `out` (+ A1111's sidecar JSON).

    `strength` scales the delta relative to the layer's default-init weight scale so that the
    LoRA visibly changes the image without blowing the random model up.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, (out_f, in_f) in sorted(kohya_attention_layers(checkpoint).items()):
        down = torch.randn(rank, in_f, generator=gen) / in_f**0.5
        up = torch.randn(out_f, rank, generator=gen) * strength / (3 * rank) ** 0.5
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank),
        "ss_base_model_version": "sd_v1",
        "ss_output_name": out.stem,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    if activation_text:
        sidecar = {
            "activation text": activation_text,
            "preferred weight": 1.0,
            "description": "tiny test LoRA",
        }
        out.with_suffix(".json").write_text(json.dumps(sidecar), encoding="utf-8")
    return out
