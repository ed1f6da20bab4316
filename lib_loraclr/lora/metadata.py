"""What a LoRA file says about itself: trigger words, rank, alpha, base model family.

Trigger words come, in order of trust, from A1111's user metadata next to the file (the
"activation text" a user typed), ``modelspec.trigger_phrase``, and kohya's training tags
(``ss_tag_frequency``: the most frequent tags), then ``ss_output_name``.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from lib_loraclr.errors import ModelMismatchError
from lib_loraclr.lora.formats import input_features, split_key

log = logging.getLogger(__name__)
_LDM_UNET = "model.diffusion_model."


def sidecar_metadata(path: str | Path) -> dict:
    """A1111's per-file user metadata (``NAME.json`` next to ``NAME.safetensors``), or ``{}``."""
    sidecar = Path(path).with_suffix(".json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning("%s: ignoring unreadable user metadata (%s)", sidecar.name, error)
        return {}
    return data if isinstance(data, dict) else {}


def _split_words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def trigger_words(path: str | Path, metadata: dict[str, str], top_tags: int = 3) -> list[str]:
    """Trigger words/phrases, most trusted first, without duplicates."""
    words: list[str] = []
    activation = sidecar_metadata(path).get("activation text")
    if isinstance(activation, str):
        words += _split_words(activation)
    phrase = metadata.get("modelspec.trigger_phrase")
    if phrase:
        words += _split_words(phrase)
    raw_tags = metadata.get("ss_tag_frequency")
    if raw_tags:
        try:
            folders = json.loads(raw_tags)
            counts: Counter[str] = Counter()
            for tags in folders.values():
                for tag, count in tags.items():
                    counts[tag.strip()] += int(count)
            words += [tag for tag, _ in counts.most_common(top_tags) if tag]
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            log.warning("%s: ss_tag_frequency is not valid JSON; ignored", Path(path).name)
    if not words and metadata.get("ss_output_name"):
        words.append(metadata["ss_output_name"])
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]


def base_model_from_metadata(metadata: Mapping[str, str]) -> str | None:
    """``sd1`` / ``sd2`` / ``sdxl`` from kohya's or modelspec's training metadata, if it says.

    ``ss_sd_model_name`` (the trainer's checkpoint file name) is not used: names such as
    ``realisticVision_v20`` would be misread.
    """
    for key in ("modelspec.architecture", "ss_base_model_version"):
        text = str(metadata.get(key, "")).lower()
        if not text:
            continue
        if "xl" in text:
            return "sdxl"
        if re.search(r"(?:^|[^a-z0-9])(?:sd_?)?v2|diffusion-v2", text):
            return "sd2"
        if re.search(r"(?:^|[^a-z0-9])(?:sd_?)?v1|diffusion-v1", text):
            return "sd1"
    v2 = str(metadata.get("ss_v2", "")).lower()
    if v2 in ("true", "false"):
        return "sd2" if v2 == "true" else "sd1"
    return None


# -- model families: refuse a LoRA made for another base model ------------------------------------
FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "unknown": "an unknown model"}
# kohya's SDXL names: two text encoders and ldm-style UNet block names; diffusers' second encoder.
SDXL_KEY_PREFIXES = (
    "lora_te1_",
    "lora_te2_",
    "lora_unet_input_blocks_",
    "lora_unet_output_blocks_",
    "lora_unet_middle_block_",
    "text_encoder_2.",
)
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_TEXT_WIDTH_FAMILY = {768: "sd1", 1024: "sd2", 1280: "sdxl"}


def _input_widths(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Module part -> input features, from the factor that multiplies the layer's input."""
    by_part: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        split = split_key(key)
        if split is not None:
            by_part.setdefault(split[0], {})[split[1]] = shape
    return {part: width for part, layer in by_part.items() if (width := input_features(layer)) is not None}


def lora_family(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> str:
    """``"sd1" | "sd2" | "sdxl" | "unknown"``: the family a LoRA was made for, from its header alone.

    Evidence, strongest first: SDXL-only names; the cross-attention context width (768 / 1024 /
    2048) of an ``attn2`` key or value projection; the text encoder's depth (SD1 has 12 layers,
    SD2 23) and width (768 / 1024); then the training metadata.
    """
    if any(k.startswith(SDXL_KEY_PREFIXES) for k in shapes):
        return "sdxl"
    widths = _input_widths(shapes)
    for part, width in widths.items():
        if re.search(r"attn2[._]to_[kv]$", part):  # split_key names processor keys like the others
            return _CONTEXT_FAMILY.get(width, "unknown")
    layers = {int(m[1]) for k in shapes if (m := re.search(r"encoder[._]layers[._](\d+)[._]", k))}
    if layers and max(layers) >= 12:
        return "sd2"
    for part, width in widths.items():
        if re.search(r"(?:self_attn[._][qkv]_proj|mlp[._]fc1)$", part) and width in _TEXT_WIDTH_FAMILY:
            return _TEXT_WIDTH_FAMILY[width]
    return base_model_from_metadata(dict(metadata or {})) or "unknown"


def checkpoint_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The family of an ldm checkpoint (or of a WebUI model's state-dict keys)."""
    keys = shapes.keys()
    if (
        any(k.startswith("conditioner.embedders.") for k in keys)
        or f"{_LDM_UNET}label_emb.0.0.weight" in keys
    ):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return "sd2"
    context = shapes.get(f"{_LDM_UNET}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
    if context is not None:
        return _CONTEXT_FAMILY.get(context[-1], "unknown")
    return "sd1" if any(k.startswith(_LDM_UNET) for k in keys) else "unknown"


def require_family(lora_family_: str, model_family: str, lora_name: str) -> None:
    """Raise :class:`ModelMismatchError` naming both families unless they agree (or one is unknown)."""
    if "unknown" in (lora_family_, model_family) or lora_family_ == model_family:
        return
    made_for, loaded = (
        FAMILY_NAMES.get(lora_family_, lora_family_),
        FAMILY_NAMES.get(model_family, model_family),
    )
    raise ModelMismatchError(
        f"{lora_name}: this LoRA was made for {made_for} but the loaded model is {loaded}; "
        f"load a {made_for} checkpoint, or pick a LoRA trained for {loaded}"
    )


PEFT_METADATA_KEY = "lora_adapter_metadata"  # where diffusers' save_lora_weights keeps PEFT's LoraConfig


def peft_alpha_note(metadata: Mapping[str, str], name: str) -> str | None:
    """A warning when a PEFT file keeps its ``lora_alpha`` only in ``lora_adapter_metadata``.

    A1111's built-in Lora reads no such metadata and applies these layers at scale 1 instead of the
    trained ``alpha / r``; we keep the host's scale (a merge or composition must match what the
    WebUI renders for ``<lora:NAME>``), and say which weight gives the trained strength.
    """
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except (TypeError, ValueError):
        return None
    scales, patterned = {}, False
    for part in ("unet", "text_encoder"):
        r, alpha = config.get(f"{part}.r"), config.get(f"{part}.lora_alpha")
        if r and alpha is not None:
            scales[part] = float(alpha) / (float(r) ** 0.5 if config.get(f"{part}.use_rslora") else float(r))
            patterned |= bool(config.get(f"{part}.alpha_pattern") or config.get(f"{part}.rank_pattern"))
    if all(abs(s - 1.0) < 1e-6 for s in scales.values()):
        return None
    unet = scales.get("unet", scales.get("text_encoder", 1.0))
    te = scales.get("text_encoder", unet)  # a part the file lacks takes the other's
    tag = f"<lora:{name}:{unet:g}>" if abs(te - unet) < 1e-6 else f"<lora:{name}:{te:g}:{unet:g}>"
    extra = " (the file also has per-layer alpha/rank patterns)" if patterned else ""
    return (
        f"{name}: its PEFT metadata gives a trained scale of {', '.join(f'{k} {v:g}' for k, v in scales.items())}"
        f"{extra}, but the WebUI's built-in Lora (and so this extension) applies scale 1; write {tag} for the "
        "trained strength"
    )
