"""What a LoRA file says about itself: trigger words, rank, alpha, base model.

Trigger words come, in order of trust, from A1111's user metadata next to the file (the
"activation text" a user typed), ``modelspec.trigger_phrase``, and kohya's training tags
(``ss_tag_frequency``: the most frequent tags), then ``ss_output_name``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

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


def base_model_from_metadata(metadata: dict[str, str]) -> str | None:
    """``sd1`` / ``sd2`` / ``sdxl`` from training metadata, if it says."""
    text = " ".join(
        metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name")
    ).lower()
    if not text.strip():
        return None
    if "xl" in text:
        return "sdxl"
    if "v2" in text or "sd_2" in text or "stable-diffusion-v2" in text or "sd-2" in text:
        return "sd2"
    if "v1" in text or "sd_1" in text or "stable-diffusion-v1" in text or "sd-1" in text:
        return "sd1"
    return None
