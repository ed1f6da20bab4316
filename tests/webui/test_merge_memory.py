"""The merge's memory plan in the tab: shown on request, a merge that cannot fit refused before
any work, and a base the writer cannot copy (a .ckpt) refused up front with the WebUI's wording."""

from __future__ import annotations

import html
import re
import shutil

from tests.webui.test_merge_tab import ROWS, Tab, _no_hooks, _snapshot, _unchanged


def test_estimate_shows_the_plan_and_merges_nothing(host) -> None:
    tabs = Tab(host)
    before = _snapshot(host.view)
    status = html.unescape(tabs.script.estimate_clicked(*tabs.values(ROWS)))
    assert "Memory plan on cpu" in status and "fits" in status and "feature pass" in status, status
    assert "spatial" in status and "te" in status
    assert sorted(p.name for p in host.ckpt_dir.iterdir()) == ["tiny.safetensors"]
    assert _unchanged(host.view, before) and _no_hooks(host.view)


def test_a_merge_over_the_memory_limit_is_refused_before_any_work(host) -> None:
    tabs = Tab(host)
    before = _snapshot(host.view)
    _, title, status = tabs.merge(ROWS, max_memory="64KiB")
    status = html.unescape(status)
    assert title == "" and "budget is 64.00 KiB" in status and "Raise the memory limit" in status, status
    assert sorted(p.name for p in host.ckpt_dir.iterdir()) == ["tiny.safetensors"]
    assert _unchanged(host.view, before) and _no_hooks(host.view)
    _, _, bad = tabs.merge(ROWS, max_memory="lots")
    assert "max_memory" in html.unescape(bad) and "24GiB" in html.unescape(bad)


def test_a_limit_that_needs_several_passes_still_merges(host) -> None:
    tabs = Tab(host)
    unbounded = _passes(tabs.script.estimate_clicked(*tabs.values(ROWS, max_memory="1TiB")))
    _, title, status = tabs.merge(ROWS, max_memory="12MiB", output_name="tight")
    assert "Saved" in status and title, html.unescape(status)
    assert _passes(status) > unbounded, (unbounded, html.unescape(status))


def _passes(status: str) -> int:
    return int(re.search(r"(\d+) feature pass", status).group(1))


def test_a_ckpt_base_is_refused_before_any_work(host, monkeypatch) -> None:
    shutil.copyfile(host.ckpt, host.ckpt_dir / "old.ckpt")
    host.sd_models.list_models()
    from lib_loraclr.merge import engine

    def never(*args, **kwargs):
        raise AssertionError("the merge started")

    monkeypatch.setattr(engine, "merge_loras", never)
    tabs = Tab(host)
    _, title, status = tabs.merge(ROWS, base="old.ckpt")
    status = html.unescape(status)
    assert title == "" and "not a .safetensors file" in status and "Checkpoint Merger" in status, status
    assert "--allow-pickle" not in status
