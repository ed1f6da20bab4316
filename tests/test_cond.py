"""Conditioning as one value: rows, stacking, casting, and the WebUI's two forms of it."""

from __future__ import annotations

import pytest
import torch

from lib_loraclr.sd.cond import Cond, cat
from lib_loraclr.webui.model import WebUIModel, cond_from_host, host_cond


def _cond(rows: int, start: float = 0.0) -> Cond:
    context = torch.arange(rows * 6, dtype=torch.float32).reshape(rows, 3, 2) + start
    return Cond(context, {"vector": torch.arange(rows, dtype=torch.float32)[:, None] + start})


def test_rows_cat_and_repeat_keep_every_part_row_aligned() -> None:
    a, b = _cond(2), _cond(3, 100.0)
    both = cat([a, b])
    assert len(both) == 5 and both.tokens == 3
    picked = both.rows(torch.tensor([4, 0]))
    torch.testing.assert_close(picked.context, torch.stack([b.context[2], a.context[0]]))
    torch.testing.assert_close(picked.extra["vector"], torch.tensor([[102.0], [0.0]]))
    torch.testing.assert_close(both.rows(slice(1, 3)).extra["vector"], torch.tensor([[1.0], [100.0]]))
    twice = a.repeat(2)
    torch.testing.assert_close(twice.extra["vector"], torch.tensor([[0.0], [1.0], [0.0], [1.0]]))
    assert a.to(torch.float64).extra["vector"].dtype == torch.float64


def test_parts_must_agree() -> None:
    with pytest.raises(ValueError, match="rows"):
        Cond(torch.zeros(2, 3, 2), {"vector": torch.zeros(3, 1)})
    with pytest.raises(ValueError, match="parts"):
        cat([_cond(1), Cond(torch.zeros(1, 3, 2))])


def test_host_forms_round_trip() -> None:
    """ldm's conditioning is a context tensor and goes back as ``c_crossattn``; sgm's is a dict
    whose ``vector`` must reach the model too (it was dropped before, silently)."""
    context = torch.randn(2, 77, 8)
    assert host_cond(cond_from_host(context))["c_crossattn"][0] is context
    sgm = {"crossattn": context, "vector": torch.randn(2, 16)}
    form = host_cond(cond_from_host(sgm), image_cond=torch.zeros(2, 5, 1, 1))
    assert set(form) == {"crossattn", "vector", "c_concat"}
    assert form["vector"] is sgm["vector"]


class _SgmLikeModel:
    """Just enough of a host model whose learned conditioning is a dict."""

    def __init__(self) -> None:
        self.model = type("Wrapper", (), {"diffusion_model": torch.nn.Linear(1, 1)})()
        self.seen: dict = {}

    def get_learned_conditioning(self, prompts):
        n = len(prompts)
        return {"crossattn": torch.ones(n, 77, 4), "vector": torch.full((n, 6), 3.0)}

    def apply_model(self, x, t, cond):
        self.seen = cond
        return x


def test_webui_model_passes_the_whole_conditioning_to_the_host() -> None:
    host = _SgmLikeModel()
    model = WebUIModel(host)
    cond = model.encode_prompt(["a cat", "a dog"])
    assert set(cond.extra) == {"vector"}
    model.eps(torch.zeros(2, 4, 8, 8), 10, cond)
    torch.testing.assert_close(host.seen["vector"], torch.full((2, 6), 3.0))
