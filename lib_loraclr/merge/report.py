"""Fidelity report of a merge: does every concept survive, and does any bleed into another?

Layer level, from the same Gram statistics the merge used (no extra pass):

- ``error_k = ||X_k W'^T - Y_k|| / ||X_k (W + w_k dW_k)^T - X_k W^T||`` summed over layers
  (0: LoRA k reproduced exactly on its own features; 1: as if LoRA k were absent);
- ``cross_talk_k = max_{j != k} <X_k D^T, X_k E_j^T> / ||X_k E_j^T||^2`` with ``D = W' - W`` and
  ``E_j = w_j dW_j``: the fraction of LoRA j's effect that the merged change carries on concept
  k's features (0: none; the naive sum gives about 1).

Model level: the merged UNet's noise prediction on concept k's prompt against LoRA k's own, at a
few timesteps, relative to LoRA k's effect: ``||eps_merged - eps_k|| / ||eps_k - eps_base||``.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping
from typing import Any

import torch

from lib_loraclr.lora.routing import RoutedLora, route_loras
from lib_loraclr.sd.patches import offsets_applied


class LayerReport:
    """Layer-level figures of one method, accumulated chunk by chunk while the statistics are held.

    ``d_kk^2`` comes from the solver's expansion (:mod:`~lib_loraclr.merge.expansion`, accurate near
    the fit); ``own[k, j] = ||X_k E_j^T||^2`` and ``cross[k, j] = <X_k D^T, X_k E_j^T>`` from its
    ``effects``, through the LoRAs' low-rank factors. A chunk's figures are formed on the merge
    device and copied to the host once.
    """

    def __init__(self, concepts: int) -> None:
        K = concepts
        self.K = K
        self.num = torch.zeros(K, dtype=torch.float64)
        self.den = torch.zeros(K, dtype=torch.float64)
        self.talk_num = torch.zeros(K, K, dtype=torch.float64)
        self.talk_den = torch.zeros(K, K, dtype=torch.float64)
        self.per_group: dict[str, list[float]] = {}

    def add(self, groups: list[str], expansion, D0: torch.Tensor, D: torch.Tensor, factors) -> None:
        """One chunk of layers (``groups[i]``: layer i's merge group). ``factors[i][j]``: LoRA j's
        ``(U, V)`` on layer i with its weight folded into ``U`` (``V`` None: ``U`` is the dense
        delta), or None when LoRA j does not touch it."""
        K = self.K
        diag = torch.diagonal(expansion.distances(D - D0), dim1=-2, dim2=-1).cpu()  # (L, K)
        own, cross = (t.cpu().double() for t in expansion.effects(D, factors))  # to the host, then float64
        own_diag = torch.diagonal(own, dim1=-2, dim2=-1)
        self.num += diag.sum(dim=0)
        self.den += own_diag.sum(dim=0)
        self.talk_num += cross.sum(dim=0)
        self.talk_den += own.sum(dim=0)
        for i, group in enumerate(groups):
            entry = self.per_group.setdefault(group, [0.0] * (2 * K))
            for k in range(K):
                entry[k] += float(diag[i, k])
                entry[K + k] += float(own_diag[i, k])

    def result(self, loras, concepts) -> dict[str, Any]:
        K = self.K
        errors = [
            math.sqrt(n / d) if d > 0 else 0.0
            for n, d in zip(self.num.tolist(), self.den.tolist(), strict=True)
        ]
        ratio = torch.where(
            self.talk_den > 0, self.talk_num / self.talk_den.clamp_min(1e-30), torch.zeros_like(self.talk_num)
        )
        ratio.fill_diagonal_(float("-inf"))
        talk = ratio.max(dim=1).values.clamp_min(0.0).tolist() if K > 1 else [0.0] * K
        concepts_out = [
            {
                "concept": concepts[k],
                "lora": loras[k].name,
                "error": errors[k],
                "cross_talk": talk[k],
                "error_by_group": {
                    g: (math.sqrt(v[k] / v[K + k]) if v[K + k] > 0 else 0.0)
                    for g, v in self.per_group.items()
                },
            }
            for k in range(K)
        ]
        return {
            "concepts": concepts_out,
            "mean_error": sum(errors) / K,
            "worst_error": max(errors),
            "mean_cross_talk": sum(talk) / K,
            "worst_cross_talk": max(talk),
        }


@torch.no_grad()
def model_level_report(
    model, layers, loras, weights, concepts, offsets, config, timesteps=(900, 500, 100)
) -> dict[str, Any]:
    """Merged UNet vs each LoRA alone on its concept prompt, relative to the LoRA's own effect."""

    K = len(loras)
    size = max(8, min(config.resolution // 8, 32))
    param = next(iter(layers.values())).weight
    gen = torch.Generator().manual_seed(config.seed + 1)
    x = torch.randn(1, 4, size, size, generator=gen).to(device=param.device, dtype=param.dtype)
    prompts = [config.templates[0].format(c) for c in concepts]
    rel = torch.zeros(K, dtype=torch.float64)
    with route_loras(layers, loras) as router:
        router.set_rows([[RoutedLora(lora, w, w)] for lora, w in zip(loras, weights, strict=True)])
        ctx_lora = model.encode_prompt(prompts)
        router.set_rows(None)
        ctx_base = model.encode_prompt(prompts)
        with offsets_applied(layers, offsets):
            ctx_merged = model.encode_prompt(prompts)
        for t in timesteps:
            tt = torch.full((K,), float(t), device=x.device)
            xs = x.repeat(K, 1, 1, 1)
            router.set_rows([[RoutedLora(lora, w, w)] for lora, w in zip(loras, weights, strict=True)])
            eps_lora = model.eps(xs, tt, ctx_lora)
            router.set_rows(None)
            eps_base = model.eps(xs, tt, ctx_base)
            with offsets_applied(layers, offsets):
                eps_merged = model.eps(xs, tt, ctx_merged)
            diff = (eps_merged - eps_lora).flatten(1).norm(dim=1).cpu().double()
            effect = (eps_lora - eps_base).flatten(1).norm(dim=1).cpu().double().clamp_min(1e-12)
            rel += diff / effect
    rel /= len(timesteps)
    values = rel.tolist()
    return {
        "timesteps": list(timesteps),
        "concepts": [{"concept": concepts[k], "relative_eps_error": values[k]} for k in range(K)],
        "mean": sum(values) / K,
        "worst": max(values),
    }


def summary(results: Mapping[str, Any]) -> dict[str, Any]:
    """The per-method figures a user compares (``{method: MergeResult}`` -> JSON-able dict)."""
    out = {}
    for method, result in results.items():
        r = result.report
        entry = {
            "worst_error": r["worst_error"],
            "mean_error": r["mean_error"],
            "worst_cross_talk": r["worst_cross_talk"],
            "mean_cross_talk": r["mean_cross_talk"],
            "concepts": r["concepts"],
        }
        if "model_level" in r:
            entry["model_worst"] = r["model_level"]["worst"]
            entry["model_mean"] = r["model_level"]["mean"]
        if r.get("diagnostics"):
            entry["diagnostics"] = r["diagnostics"]
        if "memory_plan" in r:
            entry["memory_plan"] = r["memory_plan"]
        out[method] = entry
    return out


def table(methods: Mapping[str, Mapping[str, Any]]) -> str:
    """A readable per-method, per-concept table."""
    lines = []
    header = f"{'method':<9} {'concept':<24} {'error':>7} {'x-talk':>7} {'eps err':>8}"
    lines.append(header)
    lines.append("-" * len(header))
    for method, entry in methods.items():
        for c in entry["concepts"]:
            lines.append(
                f"{method:<9} {c['concept'][:24]:<24} {c['error']:7.3f} {c['cross_talk']:7.3f} {'':>8}"
            )
        model = f"{entry['model_worst']:8.3f}" if "model_worst" in entry else f"{'':>8}"
        lines.append(
            f"{method:<9} {'WORST':<24} {entry['worst_error']:7.3f} {entry['worst_cross_talk']:7.3f} {model}"
        )
        lines.append(
            f"{method:<9} {'mean':<24} {entry['mean_error']:7.3f} {entry['mean_cross_talk']:7.3f} "
            f"{(format(entry['model_mean'], '8.3f') if 'model_mean' in entry else ''):>8}"
        )
    lines.append(
        "error: 0 = LoRA reproduced on its own features, 1 = as if absent; x-talk: share of another LoRA's effect"
    )
    lines.append(
        "carried on this concept's features; eps err: merged UNet vs the LoRA alone, relative to its effect (worst)"
    )
    return "\n".join(lines)


def report_html(methods: Mapping[str, Mapping[str, Any]]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td>{html.escape(c['concept'])}</td><td>{c['error']:.3f}</td><td>{c['cross_talk']:.3f}</td></tr>"
        for m, e in methods.items()
        for c in e["concepts"]
    )
    return (
        "<table class='loraclr-report'><tr><th>method</th><th>concept</th><th>error</th><th>cross-talk</th></tr>"
        f"{rows}</table>"
    )
