"""Screenshots of the extension in a real WebUI, for the README (docs/images/).

    SD_WEBUI_ROOT=... SD_WEBUI_PYTHON=... HF_HOME=... OMP_NUM_THREADS=1 \
    python -m tests.integration.screenshots docs/images

Starts the host with its browser UI (not ``--nowebui``) on the tiny checkpoint and LoRAs, exactly
as the suite's fixture prepares them, and drives a headless Chromium (Debian's ``chromium``
package) over its DevTools protocol with ``websockets``: no Playwright, no browser download.
Chromium resolves no host name but 127.0.0.1, so the page's web fonts (Gradio's theme asks
Google Fonts) fall back to local ones and nothing leaves the machine. Writes ``merge_tab.png``
(the "LoRACLR merge" tab with two LoRA rows) and ``clora_accordion.png`` (txt2img with the CLoRA
accordion open and its bindings table for a two-subject prompt).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .conftest import _find_checkpoint, _free_port, _stop, launch_webui, webui_root

WIDTH = 1280  # CSS pixels of the browser window; the PNGs are saved at this width
MERGE_TAGS = "<lora:tinyA:1> <lora:tinyB:0.8>"
PROMPT = "a <lora:tinyA:1> cat and a <lora:tinyB:1> dog in the garden, watercolor"


class Page:
    """One browser tab over the DevTools protocol: commands by id, events ignored."""

    def __init__(self, ws) -> None:
        self.ws, self.ids = ws, itertools.count(1)

    async def send(self, method: str, **params):
        n = next(self.ids)
        await self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            message = json.loads(await self.ws.recv())
            if message.get("id") == n:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def js(self, expression: str):
        result = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def wait_for(self, expression: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not await self.js(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never showed: {expression}")
            await asyncio.sleep(0.5)

    async def shot(self, selectors: list[str], path: Path) -> None:
        """A PNG of the smallest box around the elements ``selectors`` (page coordinates)."""
        boxes = await self.js(
            f"{json.dumps(selectors)}.map(s => {{ const r = document.querySelector(s).getBoundingClientRect();"
            " return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY]; })"
        )
        x0, y0 = min(b[0] for b in boxes) - 8, min(b[1] for b in boxes) - 8
        x1, y1 = max(b[2] for b in boxes) + 8, max(b[3] for b in boxes) + 8
        clip = {
            "x": max(0, x0),
            "y": max(0, y0),
            "width": x1 - max(0, x0),
            "height": y1 - max(0, y0),
            "scale": 1,
        }
        data = await self.send("Page.captureScreenshot", format="png", clip=clip, captureBeyondViewport=True)
        _save_small_png(base64.b64decode(data["data"]), path)


def _save_small_png(png: bytes, path: Path) -> None:
    """Fewer colours (the UI is flat), so each picture stays well under 300 KB."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    print(f"{path}: {image.width}x{image.height}, {path.stat().st_size // 1024} KB")


# Gradio 3 listens to the element's own input/blur events, as A1111's updateInput() relies on
SET_TEXT = """(() => {{
  const box = document.querySelector({selector});
  box.focus(); box.value = {text}; box.dispatchEvent(new Event("input", {{bubbles: true}}));
  box.blur(); box.dispatchEvent(new Event("blur")); return true; }})()"""


async def _merge_tab(page: Page, out: Path) -> None:
    await page.js(
        "[...document.querySelectorAll('#tabs > .tab-nav button')]"
        ".find(b => b.textContent.trim() === 'LoRACLR merge').click()"
    )
    await page.wait_for("!!document.querySelector('#loraclr_merge_tags textarea')")
    await page.js(
        SET_TEXT.format(selector=json.dumps("#loraclr_merge_tags textarea"), text=json.dumps(MERGE_TAGS))
    )
    await page.wait_for("document.querySelector('#loraclr_merge_concepts').innerText.includes('tinyB')")
    await asyncio.sleep(1)
    await page.shot(["#tabs > .tab-nav", "#tab_loraclr_merge"], out / "merge_tab.png")


async def _clora_accordion(page: Page, out: Path) -> None:
    await page.js(
        "[...document.querySelectorAll('#tabs > .tab-nav button')].find(b => b.textContent.trim() === 'txt2img').click()"
    )
    accordion = "#tab_txt2img [id$='clora_composition_accordion']"
    await page.wait_for(f"!!document.querySelector({json.dumps(accordion)})")
    await page.js(f"document.querySelector({json.dumps(accordion + ' .label-wrap')}).click()")
    await page.js(SET_TEXT.format(selector=json.dumps("#txt2img_prompt textarea"), text=json.dumps(PROMPT)))
    await page.js(f"document.querySelector({json.dumps(accordion + ' input[type=checkbox]')}).click()")
    await page.wait_for(f"document.querySelector({json.dumps(accordion)}).innerText.includes('tinyB')")
    await asyncio.sleep(1)
    await page.js(f"document.querySelector({json.dumps(accordion)}).scrollIntoView()")
    await page.shot(["#txt2img_toprow", accordion], out / "clora_accordion.png")


async def _drive(url: str, devtools_port: int, out: Path) -> None:
    import websockets

    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{devtools_port}/json/list", timeout=5) as r:
                pages = [t for t in json.loads(r.read()) if t["type"] == "page"]
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)
    async with websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:
        page = Page(ws)
        await page.send(
            "Emulation.setDeviceMetricsOverride", width=WIDTH, height=1400, deviceScaleFactor=1, mobile=False
        )
        await page.send("Page.navigate", url=url)
        await page.wait_for("!!document.querySelector('#txt2img_prompt textarea')", timeout=300)
        await asyncio.sleep(2)
        await _merge_tab(page, out)
        await _clora_accordion(page, out)


def _chromium(devtools_port: int, profile: Path) -> subprocess.Popen:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        raise SystemExit("no chromium on PATH: apt-get install -y chromium")
    args = [
        binary,
        "--headless=new",
        "--no-sandbox",  # root in a container
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        f"--remote-debugging-port={devtools_port}",
        f"--user-data-dir={profile}",
        "about:blank",
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    root = webui_root()
    with tempfile.TemporaryDirectory(prefix="loraclr-shots-") as tmp:
        with launch_webui(root, _find_checkpoint(root), Path(tmp) / "data", ui=True) as server:
            port = _free_port()
            browser = _chromium(port, Path(tmp) / "chromium")
            try:
                asyncio.run(_drive(server.url, port, out))
            finally:
                _stop(browser)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images"))
