"""The merge tab's form as data: labels, field order and the values -> request conversion.

Kept out of ``scripts/`` on purpose: A1111 executes script files without registering them in
``sys.modules``, where a dataclass with postponed annotations cannot be built; and the tab, its
tests and the docs share these names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from lib_loraclr.merge import request as mr
from lib_loraclr.webui import host as hs

METHOD_LABELS = {
    "LoRACLR (contrastive)": "loraclr",
    "Least squares": "lsq",
    "Naive sum": "sum",
    "Average": "average",
}
GROUP_LABELS = {
    "Text encoder": "te",
    "Cross-attention K/V": "cross_kv",
    "Spatial (UNet attention)": "spatial",
}
ADVANCED = (
    "iterations",
    "lr",
    "margin",
    "lambda_con",
    "lambda_mse",
    "lambda_delta",
    "weight_decay",
    "seed",
    "steps",
    "resolution",
    "cfg_scale",
)
INTEGER_PARAMS = ("iterations", "seed", "steps", "resolution")
CONCEPT_HEADERS = ["LoRA", "weight", "concept / trigger text"]


def method_label(method: str) -> str:
    return next((label for label, value in METHOD_LABELS.items() if value == method), "LoRACLR (contrastive)")


@dataclass(frozen=True)
class MergeForm:
    """The tab's values, in the order of its inputs (after the task id)."""

    base: str
    concepts: Any  # rows [name, weight, concept] or the Dataframe's pandas frame
    method: str
    groups: list
    lsq_init: bool
    iterations: float
    lr: float
    margin: float
    lambda_con: float
    lambda_mse: float
    lambda_delta: float
    weight_decay: float
    seed: float
    steps: float
    resolution: float
    cfg_scale: float
    output_name: str
    overwrite: bool
    dtype: str
    lora_rank: float
    max_memory: str = ""

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def request(self, estimate: bool = False) -> mr.MergeRequest:
        params: dict[str, Any] = {
            key: getattr(self, key) for key in ADVANCED if getattr(self, key) is not None
        }
        params["lsq_init"] = bool(self.lsq_init)
        params["groups"] = [GROUP_LABELS.get(g, g) for g in self.groups or []]
        return mr.build_request(
            hs.choices_from_rows(self.concepts),
            self.output_name,
            base=None if self.base in (None, "", hs.LOADED) else self.base,
            method=METHOD_LABELS.get(self.method, self.method),
            overwrite=bool(self.overwrite),
            dtype=self.dtype,
            lora_rank=int(self.lora_rank or 0),
            params=params,
            max_memory=(self.max_memory or "").strip() or None,
            estimate=estimate,
        )
