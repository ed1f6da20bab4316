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
from lib_loraclr.merge.engine import MergeConfig, merge_loras, plan_for
from lib_loraclr.merge.options import METHODS
from lib_loraclr.merge.report import report_html as _table_html
from lib_loraclr.merge.report import summary
from lib_loraclr.merge.request import LoraChoice, MergeRequest
from lib_loraclr.merge.sizes import default_budget
from lib_loraclr.merge.writer import check_base_file, export_lora, merge_metadata, write_merged_checkpoint

_DEFAULT = MergeConfig()


@dataclass(frozen=True)
class ServiceOptions:
    device: str | None = None
    compare_methods: bool = True  # report every method on the same statistics
    lora_dir: str | None = (
        None  # where "also save as LoRA" goes (the WebUI's Lora folder); None: beside the checkpoint
    )


def merge_config(request: MergeRequest, concepts: Sequence[str], options: ServiceOptions) -> MergeConfig:
    params = dict(request.params)
    groups = tuple(params.pop("groups", None) or _DEFAULT.groups)
    known = {f.name for f in dataclasses.fields(MergeConfig)}
    extra = {k: v for k, v in params.items() if k in known}
    return MergeConfig(
        method=request.method,
        weights=tuple(c.weight for c in request.loras),
        concepts=tuple(concepts),
        groups=groups,
        device=options.device,
        **extra,
    )


def _prepared(
    model: Any, pairs: Sequence[tuple[LoraChoice, Path]], request: MergeRequest, options: ServiceOptions
):
    shapes = {n: tuple(m.weight.shape) for n, m in model.layer_map().items()}
    family = model.family.id  # the LoRAs are read with the model's family's names
    loras = [load_lora(path, target_shapes=shapes, model_family=family) for _, path in pairs]
    for lora in loras:
        check_base_model(lora, family)
    concepts = [
        c.concept or (lora.trigger_words[0] if lora.trigger_words else lora.name)
        for (c, _), lora in zip(pairs, loras, strict=True)
    ]
    config = merge_config(request, concepts, options)
    methods = list(dict.fromkeys([request.method, *(METHODS if options.compare_methods else [])]))
    return loras, concepts, config, methods


def budget_for(request: MergeRequest, config: MergeConfig, model: Any) -> int | None:
    """The request's memory limit, else what the merge device has free now less a margin."""
    if request.max_memory is not None:
        return request.max_memory
    device = config.device or str(next(iter(model.layer_map().values())).weight.device)
    return default_budget(device)


def estimate(
    model: Any, pairs: Sequence[tuple[LoraChoice, Path]], request: MergeRequest, options: ServiceOptions
) -> dict[str, Any]:
    """The memory plan of this request on ``model`` (LoRAs read, nothing merged or written)."""
    loras, _concepts, config, methods = _prepared(model, pairs, request, options)
    plan = plan_for(model, loras, config, budget_for(request, config, model), methods=len(methods))
    return {"estimate": plan.as_json(), "method": request.method}


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
    check_base_file(base_file)  # before any work: the writer copies the base key for key
    loras, concepts, config, methods = _prepared(model, pairs, request, options)
    results = merge_loras(
        model,
        loras,
        config,
        progress=progress,
        should_stop=should_stop,
        methods=methods,
        budget=budget_for(request, config, model),
    )
    chosen = results[request.method]
    resolved = config.for_model(model)  # the metadata records the size the features came from
    params = {k: v for k, v in dataclasses.asdict(resolved).items() if k not in ("concepts", "weights")}
    meta = merge_metadata(request.method, params, loras, concepts, Path(base_file), config.weights)
    write_merged_checkpoint(base_file, out_path, chosen.offsets, dtype=request.dtype, metadata=meta)
    lora_path = None
    if request.lora_rank:
        folder = Path(options.lora_dir) if options.lora_dir else out_path.parent
        lora_path = folder / f"{out_path.stem}_lora_r{request.lora_rank}.safetensors"
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
    lines = [
        f"<p>{html.escape(m)}: worst error {e['worst_error']:.3f}, mean {e['mean_error']:.3f}, worst cross-talk "
        f"{e['worst_cross_talk']:.3f}</p>"
        for m, e in methods.items()
    ]
    return "".join(lines) + _table_html(methods)


def plan_html(plan: dict) -> str:
    """The memory plan in a sentence and a small table (tab and docs)."""
    verdict = "fits" if plan["fits"] else "does not fit"
    rows = "".join(
        f"<tr><td>{html.escape(stage)}</td><td>{e['layers']}</td><td>{e['passes']}</td>"
        f"<td>{html.escape(', '.join(f'{n} {f}' for f, n in e['forms'].items()))}</td></tr>"
        for stage, e in plan["stages"].items()
    )
    text = (
        f"<p>Memory plan on {html.escape(plan['device'])}: peak {html.escape(plan['peak'])} of "
        f"{html.escape(plan['budget'])}, {verdict}; {plan['passes']} feature pass(es).</p>"
    )
    if plan.get("message"):
        text += f"<p class='loraclr-error'>{html.escape(plan['message'])}</p>"
    return text + (
        "<table class='loraclr-report'><tr><th>stage</th><th>layers</th><th>passes</th><th>statistics forms</th></tr>"
        f"{rows}</table>"
    )
