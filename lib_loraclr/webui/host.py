"""Host-agnostic helpers for the WebUI glue; every host object arrives as a PARAMETER.

The scripts pass in what they got from the WebUI (the built-in Lora extension's ``networks``
module, ``modules.sd_models``, ``shared.cmd_opts``/``shared.opts``/``shared.state``); nothing here
imports ``modules`` or ``gradio``, so the same code is tested against the stand-in host and runs
in the real one.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_loraclr import families
from lib_loraclr.lora.metadata import sidecar_metadata, trigger_words
from lib_loraclr.merge.request import LoraChoice, MergeRequestError, find_lora_file, parse_lora_tags

log = logging.getLogger(__name__)

LOADED = "(loaded model)"
__all__ = [
    "LOADED",
    "BINDING_HEADERS",
    "BaseChoice",
    "bindings_rows",
    "clora_gallery",
    "StateProgress",
    "checkpoint_title_for",
    "copy_config_beside",
    "default_concept",
    "embedding_vectors",
    "find_lora_file",
    "lora_names",
    "lora_tag",
    "merge_folder",
    "preferred_weight",
    "resolve_base",
    "rows_from_tags",
]


# -- LoRAs through the built-in Lora extension ---------------------------------------------------------
def lora_names(networks: Any) -> list[str]:
    """Names for the picker: every file name, then aliases that differ (A1111 tags accept both)."""
    names = sorted(networks.available_networks)
    aliases = sorted(set(getattr(networks, "available_network_aliases", {})) - set(names))
    return names + aliases


def preferred_weight(path: str | None, default: float = 1.0) -> float:
    """A1111's "preferred weight" from the sidecar JSON (0 or absent means: use ``default``)."""
    if not path:
        return default
    try:
        value = float(sidecar_metadata(path).get("preferred weight") or 0)
    except (TypeError, ValueError):
        return default
    return value if value else default


def lora_tag(networks: Any, name: str, default_weight: float = 1.0) -> str:
    """``<lora:NAME:W>`` as the Lora tab's card would insert it (preferred weight first)."""
    weight = preferred_weight(find_lora_file(networks, name), default_weight)
    return f"<lora:{name}:{weight:g}>"


def default_concept(path: str | None, name: str) -> str:
    """The concept text to pre-fill: A1111's activation text first, then the file's trigger words."""
    if not path:
        return name
    from lib_loraclr.lora.safetensors_io import read_header

    try:
        words = trigger_words(path, read_header(path).metadata)
    except Exception as error:  # noqa: BLE001 - a bad file is reported when merging; pre-filling just falls back
        log.info("%s: no trigger words (%s)", Path(path).name, error)
        words = []
    return words[0] if words else name


BINDING_HEADERS = ["LoRA", "weight", "subject words", "trigger"]


def bindings_rows(networks: Any, prompt: str) -> tuple[list[list], str]:
    """The CLoRA accordion's read-only table for ``prompt``: one row per bound LoRA, and a note
    (style LoRAs that stay with the built-in Lora, or what is wrong with the prompt)."""
    from lib_loraclr.clora.prompts import split_bindings
    from lib_loraclr.errors import PromptError

    try:
        _, bindings, styles = split_bindings(prompt or "")
    except PromptError as error:
        return [], "Prompt: " + str(error).replace("<", "&lt;")  # shown as Markdown: keep the tags' brackets
    rows = []
    for b in bindings:
        path = find_lora_file(networks, b.lora)
        trigger = default_concept(path, "") if path else "(LoRA not found)"
        rows.append([b.lora, b.unet, b.subject, trigger])
    notes = []
    if not bindings:
        notes.append(
            "No bindings: write `<lora:NAME:WEIGHT>` directly before a subject word."
        )  # a code span keeps <> in Markdown
    if styles:
        notes.append("Applied to everything by the built-in Lora: " + ", ".join(s.lora for s in styles))
    return rows, " ".join(notes)


def clora_gallery(cores: list) -> list[tuple[Any, str]]:
    """ "Show attention masks": per image of the batch, the binary mask of the base and of each
    bound LoRA, then each LoRA's attention heatmap, as ``(uint8 array (h, w), caption)`` at map
    resolution (the script scales them to the image)."""
    from lib_loraclr.clora.maps import concept_heatmaps

    out = []
    for image, (plan, core) in enumerate(cores, start=1):
        state = core.state
        if state.masks is None:
            continue
        h, w = state.map_hw  # set with the masks
        names = [b.lora for b in plan.bindings]
        masks = state.masks.cpu()  # kept on the model's device until shown
        for v, name in enumerate(["base", *names]):
            out.append(
                ((masks[v].reshape(h, w).numpy() * 255).astype("uint8"), f"CLoRA mask {image}: {name}")
            )
        heat = concept_heatmaps(state.maps, plan, core.variant_rows(core.all_rows))
        for v, name in enumerate(names):
            out.append(
                ((heat[v].reshape(h, w).numpy() * 255).astype("uint8"), f"CLoRA attention {image}: {name}")
            )
    return out


def embedding_vectors(embedding_db: Any) -> dict[str, int]:
    """Textual-inversion embeddings as CLoRA's token positions need them: name -> number of
    vectors, from the host's ``modules.sd_hijack.model_hijack.embedding_db`` (``word_embeddings``:
    name -> ``Embedding`` with ``vectors``; the embeddings loaded for the current model, the ones
    its prompt encoder substitutes). ``None`` or an unexpected object gives no embeddings."""
    found = getattr(embedding_db, "word_embeddings", None) or {}
    out = {}
    for name, embedding in dict(found).items():
        try:
            vectors = int(getattr(embedding, "vectors", 0) or 0)
        except (TypeError, ValueError):
            continue
        if vectors > 0:
            out[str(name)] = vectors
    return out


def rows_from_tags(networks: Any, tags_text: str, rows: list[list] | None) -> list[list]:
    """Concept-table rows ``[name, weight, concept]`` for pasted tags.

    A row the user already edited keeps its concept text; unknown names still get a row (the
    merge reports them all at once), with the name as the concept.
    """
    existing = {str(r[0]): r for r in (rows or []) if r and r[0]}
    out: list[list] = []
    for choice in parse_lora_tags(tags_text):
        if choice.name in existing and str(existing[choice.name][2] or "").strip():
            concept = existing[choice.name][2]
        else:
            concept = default_concept(find_lora_file(networks, choice.name), choice.name)
        out.append([choice.name, choice.weight, concept])
    return out


def choices_from_rows(rows: Any) -> list[LoraChoice]:
    """The concept table (list of rows or a pandas frame) -> choices; blank rows are skipped."""
    values = rows.values.tolist() if hasattr(rows, "values") else list(rows or [])
    choices = []
    for row in values:
        if not row or not str(row[0] or "").strip():
            continue
        weight = row[1] if len(row) > 1 and row[1] not in (None, "") else 1.0
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise MergeRequestError(f"{row[0]}: weight {weight!r} is not a number") from None
        concept = str(row[2] or "").strip() if len(row) > 2 else ""
        choices.append(LoraChoice(str(row[0]).strip(), weight, concept or None))
    return choices


# -- checkpoints through modules.sd_models ---------------------------------------------------------------
@dataclass(frozen=True)
class BaseChoice:
    filename: str
    is_loaded: bool
    title: str


def resolve_base(sd_models: Any, sd_model: Any, base: str | None) -> BaseChoice:
    """The base checkpoint's file; ``None``/``LOADED`` (or the loaded file itself) is the loaded model."""
    loaded = getattr(sd_model, "sd_checkpoint_info", None) if sd_model is not None else None
    if not base or base == LOADED:
        if loaded is None:
            raise MergeRequestError(
                f"no model is loaded; load an {families.DEFAULT.example} checkpoint or pick a base checkpoint"
            )
        return BaseChoice(loaded.filename, True, loaded.title)
    info = sd_models.get_closet_checkpoint_match(base)
    if info is None:
        raise MergeRequestError(
            f"checkpoint {base!r} not found; pick one from the list (click refresh after adding files)", 404
        )
    same = loaded is not None and os.path.abspath(info.filename) == os.path.abspath(loaded.filename)
    return BaseChoice(info.filename, same, info.title)


def merge_folder(cmd_opts: Any, opts: Any, default_dir: str) -> str:
    """Where merges go: ``--loraclr-merge-dir``, the setting, ``--ckpt-dir``, the WebUI's model folder."""
    folder = (
        getattr(cmd_opts, "loraclr_merge_dir", None)
        or getattr(opts, "loraclr_merge_dir", "")
        or getattr(cmd_opts, "ckpt_dir", None)
        or default_dir
    )
    os.makedirs(folder, exist_ok=True)
    return str(folder)


def checkpoint_title_for(sd_models: Any, path: str | Path) -> str | None:
    """The title the WebUI lists for ``path`` (after ``list_models()``), or ``None`` if unlisted."""
    target = os.path.abspath(path)
    for info in sd_models.checkpoints_list.values():
        if os.path.abspath(info.filename) == target:
            return info.title
    return None


def copy_config_beside(base_file: str | Path, out_path: str | Path) -> Path | None:
    """A base with its own ``.yaml`` needs it beside the merge too (A1111's merger does the same)."""
    config = Path(base_file).with_suffix(".yaml")
    target = Path(out_path).with_suffix(".yaml")
    if config.is_file() and not target.exists():
        shutil.copyfile(config, target)
        return target
    return None


# -- progress and Interrupt/Skip through shared.state ------------------------------------------------------
class StateProgress:
    """``progress``/``should_stop`` callbacks for the engines that write to the WebUI's ``shared.state``.

    The progress bar reads ``job_count``/``job_no`` and ``sampling_step``/``sampling_steps``;
    Interrupt and Skip set ``interrupted``/``skipped``. Both stop a merge (nothing is written).
    """

    def __init__(self, state: Any, label: str = "LoRACLR") -> None:
        self.state = state
        self.label = label

    def __call__(self, done: int, total: int, what: str) -> None:
        state = self.state
        state.job_count = 1
        state.sampling_steps = max(int(total), 1)
        state.sampling_step = int(done)
        state.textinfo = f"{self.label}: {what}"

    def should_stop(self) -> bool:
        return bool(getattr(self.state, "interrupted", False) or getattr(self.state, "skipped", False))


def lora_folder(cmd_opts: Any, networks: Any) -> str | None:
    """The WebUI's Lora folder: ``--lora-dir`` (the built-in's own option), else what the built-in uses."""
    return getattr(cmd_opts, "lora_dir", None) or getattr(networks, "lora_dir", None) or None
