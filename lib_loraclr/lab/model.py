"""The lab's SD1.x model: SD1.5's architecture and schedule at widths a 2-core CPU can train.

Widths are multiples of 32 because ldm (and so A1111) hard-codes 32-group GroupNorm. Everything
the host reads from a config (``use_checkpoint: True``, the schedule, the 0.18215 latent scale,
attention at the first three levels) keeps SD1.5's stock value; only sizes differ. The written
``.yaml`` is A1111's ``v1-inference.yaml`` structure with those sizes, so the host loads the
checkpoint like any SD1.5 file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from lib_loraclr.sd.checkpoint import load_checkpoint, save_checkpoint
from lib_loraclr.sd.configs import build_modules, sd15_config, sd_alphas_cumprod
from lib_loraclr.sd.model import SDModel

LAB_UNET = {
    "block_out_channels": [32, 64, 64, 64],
    "attention_head_dim": 4,  # diffusers' name for SD1.x's number of heads
    "cross_attention_dim": 64,
    "norm_num_groups": 32,
    "sample_size": 8,
}
LAB_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_hidden_layers": 4,
    "projection_dim": 64,
}
LAB_VAE = {
    "block_out_channels": [32, 32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 64,
}


def lab_configs() -> dict[str, dict[str, Any]]:
    return {
        "unet": {**sd15_config("unet"), **LAB_UNET},
        "text_encoder": {**sd15_config("text_encoder"), **LAB_TEXT},
        "vae": {**sd15_config("vae"), **LAB_VAE},
        "scheduler": sd15_config("scheduler"),
    }


def build_lab_model(seed: int = 0, tokenizer: Any = None) -> SDModel:
    """A freshly initialised lab model (the libraries' own initialisers, seeded), in train mode."""
    if tokenizer is None:
        from lib_loraclr.sd.tokenizer import load_clip_tokenizer

        tokenizer = load_clip_tokenizer()
    cfg = lab_configs()
    torch.manual_seed(seed)
    unet, text_encoder, vae = build_modules(cfg["unet"], cfg["text_encoder"], cfg["vae"])
    _keep_vocabulary(text_encoder, tokenizer)
    return SDModel(unet, text_encoder, tokenizer, vae, sd_alphas_cumprod(cfg["scheduler"]), cfg)


@torch.no_grad()
def _keep_vocabulary(text_encoder: torch.nn.Module, tokenizer: Any) -> None:
    """Zero the embedding rows of every token the world never uses (before training, so the
    trained model is exactly what is stored). Those rows would stay at their random start anyway;
    zeros keep the committed file compressible (git stores 40 k zero rows in a few bytes). The
    world's words and the identities' triggers keep theirs: the triggers must stay distinct
    vectors, since a LoRA does not train embeddings."""
    from lib_loraclr.lab.world import vocabulary

    keep = {tokenizer.bos_token_id, tokenizer.eos_token_id}
    for word in vocabulary():
        keep.update(tokenizer(word, add_special_tokens=False)["input_ids"])
    table = text_encoder.get_input_embeddings().weight
    drop = torch.ones(len(table), dtype=torch.bool)
    drop[sorted(keep)] = False
    table[drop] = 0


def load_lab_model(path: str | Path) -> SDModel:
    """The lab checkpoint as a frozen eval-mode :class:`SDModel` in float32."""
    return load_checkpoint(path, dtype=torch.float32).eval().requires_grad_(False)


def save_lab_model(model: SDModel, path: str | Path, note: dict[str, Any]) -> None:
    """fp16 ldm-layout checkpoint with the lab's note in its metadata, and the A1111 ``.yaml`` beside it."""
    meta = {"loraclr_lab": json.dumps(note, sort_keys=True), "modelspec.title": "loraclr quality lab"}
    save_checkpoint(model, path, dtype=torch.float16, metadata=meta)


def webui_yaml(clip_folder: str) -> str:
    """A1111's ``v1-inference.yaml`` with the lab's sizes; ``clip_folder`` holds the text encoder's
    ``config.json`` and tokenizer files (a local folder is a valid transformers name)."""
    unet, vae, text = LAB_UNET, LAB_VAE, LAB_TEXT
    mults = [c // unet["block_out_channels"][0] for c in unet["block_out_channels"]]
    vae_mults = [c // vae["block_out_channels"][0] for c in vae["block_out_channels"]]
    config = {
        "model": {
            "base_learning_rate": 1.0e-04,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.00085,
                "linear_end": 0.0120,
                "num_timesteps_cond": 1,
                "log_every_t": 200,
                "timesteps": 1000,
                "first_stage_key": "jpg",
                "cond_stage_key": "txt",
                "image_size": 8,
                "channels": 4,
                "cond_stage_trainable": False,
                "conditioning_key": "crossattn",
                "monitor": "val/loss_simple_ema",
                "scale_factor": 0.18215,
                "use_ema": False,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "image_size": 32,
                        "in_channels": 4,
                        "out_channels": 4,
                        "model_channels": unet["block_out_channels"][0],
                        "attention_resolutions": [4, 2, 1],
                        "num_res_blocks": 2,
                        "channel_mult": mults,
                        "num_heads": unet["attention_head_dim"],
                        "use_spatial_transformer": True,
                        "transformer_depth": 1,
                        "context_dim": unet["cross_attention_dim"],
                        "use_checkpoint": True,
                        "legacy": False,
                    },
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": 4,
                        "monitor": "val/rec_loss",
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": 4,
                            "resolution": 256,
                            "in_channels": 3,
                            "out_ch": 3,
                            "ch": vae["block_out_channels"][0],
                            "ch_mult": vae_mults,
                            "num_res_blocks": vae["layers_per_block"],
                            "attn_resolutions": [],
                            "dropout": 0.0,
                        },
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                    "params": {"version": clip_folder},
                },
            },
        }
    }
    assert text["hidden_size"] == unet["cross_attention_dim"]
    return json.dumps(config, indent=2)  # JSON is YAML; no yaml dependency needed


def write_clip_folder(folder: str | Path) -> Path:
    """What A1111's text-encoder loader reads from its ``version`` folder: the lab text encoder's
    transformers ``config.json`` and the CLIP tokenizer's files (the weights come from the
    checkpoint)."""
    from transformers import CLIPTextConfig

    from lib_loraclr.sd.tokenizer import tokenizer_dir

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    CLIPTextConfig(**lab_configs()["text_encoder"]).save_pretrained(folder)
    # the slow tokenizer's two files, which every transformers version reads (a newer version's
    # save_pretrained writes only tokenizer.json, which the WebUI's transformers 4.30 cannot use)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(Path(tokenizer_dir()) / name, folder / name)
    return folder
