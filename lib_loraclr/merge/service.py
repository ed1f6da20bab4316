"""One merge for a front end (WebUI tab, API): request in, files and report out.

Shared by the tab and the API route so both validate, merge, write and report the same way.
The model is any :class:`~lib_loraclr.merge.engine.MergeModel` (the WebUI adapter in practice).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_loraclr.lora.file import check_base_model, load_lora
from lib_loraclr.merge.engine import METHODS, MergeConfig, merge_loras
from lib_loraclr.merge.report import report_html as _table_html
from lib_loraclr.merge.report import summary
from lib_loraclr.merge.request import LoraChoice, MergeRequest
from lib_loraclr.merge.writer import export_lora, merge_metadata, write_merged_checkpoint

_DEFAULT = MergeConfig()
MERGE_DEFAULTS = {
    "iterations": _DEFAULT.iterations, "lr": _DEFAULT.lr, "margin": _DEFAULT.margin, "lambda_delta": _DEFAULT.lambda_delta,
    "lambda_mse": _DEFAULT.lambda_mse, "seed": _DEFAULT.seed, "steps": _DEFAULT.steps, "resolution": _DEFAULT.resolution,
    "lsq_init": _DEFAULT.lsq_init,
}  # fmt: skip


@dataclass(frozen=True)
class ServiceOptions:
    device: str | None = None
    compare_methods: bool = True  # report every method on the same statistics


def merge_config(request: MergeRequest, concepts: Sequence[str], options: ServiceOptions) -> MergeConfig:
    params = dict(request.params)
    groups = tuple(params.pop("groups", None) or _DEFAULT.groups)
    known = {f.name for f in dataclasses.fields(MergeConfig)}
    extra = {k: v for k, v in params.items() if k in known}
    return MergeConfig(method=request.method, weights=tuple(c.weight for c in request.loras), concepts=tuple(concepts),
                       groups=groups, device=options.device, **extra)  # fmt: skip


def merge_to_checkpoint(
    model: Any,
    pairs: Sequence[tuple[LoraChoice, Path]],
    request: MergeRequest,
    base_file: str | Path,
    out_path: Path,
    options: ServiceOptions,
    progress: Callable[[int, int, str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    shapes = {n: tuple(m.weight.shape) for n, m in model.layer_map().items()}
    loras = [load_lora(path, target_shapes=shapes) for _, path in pairs]
    for lora in loras:
        check_base_model(lora, getattr(model, "family", "sd1"))
    concepts = [c.concept or (lora.trigger_words[0] if lora.trigger_words else lora.name) for (c, _), lora in zip(pairs, loras, strict=True)]
    config = merge_config(request, concepts, options)
    methods = list(dict.fromkeys([request.method, *(METHODS if options.compare_methods else [])]))
    results = merge_loras(model, loras, config, progress=progress, should_stop=should_stop, methods=methods)
    chosen = results[request.method]
    params = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("concepts", "weights")}
    meta = merge_metadata(request.method, params, loras, concepts, Path(base_file))
    write_merged_checkpoint(base_file, out_path, chosen.offsets, dtype=request.dtype, metadata=meta)
    lora_path = None
    if request.lora_rank:
        lora_path = out_path.with_name(out_path.stem + f"_lora_r{request.lora_rank}.safetensors")
        export_lora(chosen.offsets, lora_path, request.lora_rank, metadata=meta)
    return {
        "path": str(out_path),
        "lora_path": str(lora_path) if lora_path else None,
        "method": request.method,
        "report": {"method": request.method, "methods": summary(results)},
    }


def report_html(report: dict) -> str:
    methods = report.get("methods") or {}
    if not methods:
        return ""
    lines = [f"<p>{html.escape(m)}: worst error {e['worst_error']:.3f}, mean {e['mean_error']:.3f}, worst cross-talk "
             f"{e['worst_cross_talk']:.3f}</p>" for m, e in methods.items()]  # fmt: skip
    return "".join(lines) + _table_html(methods)
