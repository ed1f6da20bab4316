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

from lib_loraclr import families
from lib_loraclr.errors import ModelMismatchError
from lib_loraclr.lora.formats import input_features, split_key

log = logging.getLogger(__name__)


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
    """The family id kohya's or modelspec's training metadata names, if it says.

    ``ss_sd_model_name`` (the trainer's checkpoint file name) is not used: names such as
    ``realisticVision_v20`` would be misread.
    """
    for key in ("modelspec.architecture", "ss_base_model_version"):
        text = str(metadata.get(key, ""))
        if text and (family := families.of_training_metadata(text)) is not None:
            return family
    return families.of_v2_flag(str(metadata.get("ss_v2", "")))


# -- model families: refuse a LoRA made for another base model ------------------------------------
FAMILY_NAMES = families.TITLES


def _input_widths(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Module part -> input features, from the factor that multiplies the layer's input."""
    by_part: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        split = split_key(key)
        if split is not None:
            by_part.setdefault(split[0], {})[split[1]] = shape
    return {part: width for part, layer in by_part.items() if (width := input_features(layer)) is not None}


def lora_family(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None) -> str:
    """The id of the family a LoRA was made for (``unknown`` if nothing tells), from its header.

    Evidence, strongest first: names only one family's files use; the cross-attention context width
    of an ``attn2`` key or value projection; the text encoder's depth and width; then the training
    metadata.
    """
    by_name = families.of_lora_names(shapes)
    if by_name is not None:
        return by_name
    widths = _input_widths(shapes)
    for part, width in widths.items():
        if re.search(r"attn2[._]to_[kv]$", part):  # split_key names processor keys like the others
            return families.by_context_width(width)
    layers = {int(m[1]) for k in shapes if (m := re.search(r"encoder[._]layers[._](\d+)[._]", k))}
    if layers and (deeper := families.by_text_depth(max(layers) + 1)) is not None:
        return deeper
    for part, width in widths.items():
        if re.search(r"(?:self_attn[._][qkv]_proj|mlp[._]fc1)$", part) and (
            family := families.by_tower_width(width)
        ):
            return family
    return base_model_from_metadata(dict(metadata or {})) or families.UNKNOWN


def checkpoint_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The family id of an ldm checkpoint (or of a WebUI model's state-dict keys)."""
    return families.of_checkpoint(shapes)


def require_family(lora_family_: str, model_family: str, lora_name: str) -> None:
    """Raise :class:`ModelMismatchError` naming both families unless they agree (or one is unknown)."""
    if families.UNKNOWN in (lora_family_, model_family) or lora_family_ == model_family:
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
