"""Start a real A1111 WebUI with this extension installed, for the opt-in `webui` tests.

Environment (see docs/webui-integration-testing.md):
- SD_WEBUI_ROOT: the WebUI checkout (required; without it every test here is skipped).
- SD_WEBUI_PYTHON: the WebUI's python (default: this interpreter).
- SD_WEBUI_CKPT: an SD1.x checkpoint (.safetensors, with its .yaml beside it if it is not
  full-size); default: the first .safetensors in $SD_WEBUI_ROOT/models/Stable-diffusion.
- SD_WEBUI_ARGS: extra launch arguments; SD_WEBUI_STARTUP_TIMEOUT: seconds (default 300).
- SD_WEBUI_FULLSIZE=1: also run test_webui_fullsize.py (a full-size random SD1.5 checkpoint on the
  host's stock config; about 2 GB in a temporary folder, minutes on a CPU).

The host's version (what A1111 itself shows: `git describe --tags` of the checkout) is printed in
pytest's header and summary and kept as `WebUI.version`, so a run's log says which host it tested.

The server runs with `--data-dir` pointing at a fresh temporary folder: the extension is
symlinked into its `extensions/`, the checkpoint (and sidecar .yaml) into its
`models/Stable-diffusion/`, and tiny LoRAs are written into its `models/Lora/`. So the WebUI
checkout itself is never modified, merges land in the temporary folder, and nothing needs restoring.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from .tiny_kohya import write_tiny_lora

REPO_ROOT = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "sd-webui-loraclr"
SKIP_REASON = "SD_WEBUI_ROOT not set: see docs/webui-integration-testing.md"
LORAS = {"tinyA": ("sks cat", 1), "tinyB": ("zwx dog", 2)}
EMBEDDING = ("tiny-style-emb", 8)  # a textual-inversion embedding of 8 vectors in <data>/embeddings


def host_version(root: Path) -> str:
    """The version A1111 shows for a checkout (its launch_utils.git_tag: `git describe --tags`)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--tags"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({error})"
    return out.stdout.strip() or f"unknown (git describe: {out.stderr.strip()[:200]})"


def _host_line() -> str | None:
    root_env = os.environ.get("SD_WEBUI_ROOT")
    if not root_env:
        return None
    root = Path(root_env).expanduser().resolve()
    python = os.environ.get("SD_WEBUI_PYTHON", sys.executable)
    return f"webui host: A1111 {host_version(root)} at {root} (python: {python})"


def pytest_report_header(config):
    line = _host_line()
    return [line] if line else []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    line = _host_line()
    if line:
        terminalreporter.write_line(f"real-host suite on {line}")


def pytest_collection_modifyitems(config, items):
    """Everything in this folder needs the real host: mark it, and skip it when it is absent."""
    here = Path(__file__).parent
    root = os.environ.get("SD_WEBUI_ROOT")
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.webui)
            if not root:
                item.add_marker(pytest.mark.skip(reason=SKIP_REASON))


@dataclass
class Response:
    status: int
    body: bytes

    def json(self):
        return json.loads(self.body.decode("utf-8"))

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@dataclass
class WebUI:
    """A running WebUI: base URL, its data dir, log file, and the files the tests made."""

    url: str
    data_dir: Path
    log_path: Path
    checkpoint: Path
    startup_s: float
    proc: subprocess.Popen
    version: str = ""
    startup_log_bytes: int = 0  # the log's length once started: what loading wrote, before any test

    def startup_log(self) -> str:
        """The server log up to the end of start-up (later lines are the tests' requests)."""
        with open(self.log_path, "rb") as log:
            return log.read(self.startup_log_bytes).decode("utf-8", "replace")

    @property
    def ckpt_dir(self) -> Path:
        return self.data_dir / "models" / "Stable-diffusion"

    @property
    def lora_dir(self) -> Path:
        return self.data_dir / "models" / "Lora"

    def request(self, method: str, path: str, body=None, timeout: float = 600) -> Response:
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return Response(resp.status, resp.read())
        except urllib.error.HTTPError as e:
            return Response(e.code, e.read())

    def get(self, path: str) -> Response:
        return self.request("GET", path)

    def post(self, path: str, body=None) -> Response:
        return self.request("POST", path, body if body is not None else {})

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def txt2img(self, **payload) -> dict:
        """POST /sdapi/v1/txt2img with small, fast defaults; fail with the server log on error."""
        body = {"steps": 4, "width": 64, "height": 64, "sampler_name": "Euler", "cfg_scale": 7, "seed": 1234}
        body.update(payload)
        r = self.post("/sdapi/v1/txt2img", body)
        assert r.status == 200, (
            f"txt2img -> {r.status}: {r.text[:2000]}\n--- server log ---\n{self.log_tail()}"
        )
        return r.json()


def decode_pixels(image_b64: str):
    """PNG (base64) -> uint8 array; compare pixels, not bytes (PNG text chunks may differ)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB"))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _find_checkpoint(root: Path) -> Path:
    env = os.environ.get("SD_WEBUI_CKPT")
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_file():
            pytest.fail(f"SD_WEBUI_CKPT={env} is not a file")
        return path
    found = sorted((root / "models" / "Stable-diffusion").glob("*.safetensors"))
    if not found:
        pytest.fail(
            f"no .safetensors checkpoint in {root / 'models' / 'Stable-diffusion'}; set SD_WEBUI_CKPT "
            "(see docs/webui-integration-testing.md for making a tiny one)"
        )
    return found[0]


def write_tiny_embedding(checkpoint: Path, path: Path, vectors: int) -> None:
    """A textual-inversion embedding (one tensor of ``vectors`` rows) as wide as the checkpoint's
    text encoder, in the single-tensor .safetensors form A1111 loads."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(checkpoint), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("token_embedding.weight"))
        width = f.get_slice(key).get_shape()[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {"emb_params": torch.randn(vectors, width, generator=torch.Generator().manual_seed(7)) * 0.01},
        str(path),
    )


def _stop(proc: subprocess.Popen) -> None:
    """Ask nicely (SIGTERM), then kill; only this fixture's own process."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def webui_root() -> Path:
    root_env = os.environ.get("SD_WEBUI_ROOT")
    if not root_env:
        pytest.skip(SKIP_REASON)
    root = Path(root_env).expanduser().resolve()
    if not (root / "launch.py").is_file():
        pytest.fail(f"SD_WEBUI_ROOT={root_env} has no launch.py; point it at an A1111 WebUI checkout")
    return root


def _ready(server: WebUI, ui: bool) -> bool:
    """Whether the server answers. With the UI, not before A1111 prints its start-up time: it sets
    up the API after Gradio's app starts serving, and a request in between breaks that set-up
    (1.10.1: "Cannot add middleware after an application has started", then txt2img answers 500)."""
    if ui and b"Startup time:" not in server.log_path.read_bytes():
        return False
    try:
        return server.request("GET", "/sdapi/v1/sd-models", timeout=5).status == 200
    except OSError:
        return False


@contextlib.contextmanager
def launch_webui(
    root: Path, checkpoint: Path, data_dir: Path, startup_timeout: float | None = None, ui: bool = False
):
    """Start the WebUI at ``root`` on ``checkpoint`` with ``data_dir`` as its --data-dir (the extension,
    the checkpoint and its sidecar .yaml if any linked in, the tiny LoRAs written), wait until it
    has generated once, yield a :class:`WebUI`, and stop it afterwards. ``ui``: with the browser UI
    too (the screenshots); the tests need only the API (``--nowebui``)."""
    python = os.environ.get("SD_WEBUI_PYTHON", sys.executable)
    ckpt_dir = data_dir / "models" / "Stable-diffusion"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / checkpoint.name).symlink_to(checkpoint)
    sidecar = checkpoint.with_suffix(".yaml")
    if sidecar.is_file():
        (ckpt_dir / sidecar.name).symlink_to(sidecar)
    (data_dir / "extensions").mkdir()
    (data_dir / "extensions" / EXTENSION_NAME).symlink_to(REPO_ROOT, target_is_directory=True)
    for name, (activation, seed) in LORAS.items():
        write_tiny_lora(
            checkpoint,
            data_dir / "models" / "Lora" / f"{name}.safetensors",
            seed=seed,
            activation_text=activation,
        )

    write_tiny_embedding(checkpoint, data_dir / "embeddings" / f"{EMBEDDING[0]}.safetensors", EMBEDDING[1])

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    args = [
        python,
        "launch.py",
        "--data-dir",
        str(data_dir),
        "--skip-prepare-environment",
        "--skip-torch-cuda-test",
        "--skip-version-check",
        "--no-download-sd-model",
        "--use-cpu",
        "all",
        "--no-half",
        "--precision",
        "full",
        "--api",
        *([] if ui else ["--nowebui"]),
        "--server-name",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-server-stop",
        "--ckpt",
        str(ckpt_dir / checkpoint.name),
    ] + os.environ.get("SD_WEBUI_ARGS", "").split()
    env = dict(os.environ)
    env.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("SD_WEBUI_LOG_LEVEL", "INFO")  # the extension's INFO lines (CLoRA's plans and passes)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("COMMANDLINE_ARGS", None)
    log_path = data_dir / "webui.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the finaliser below
    start = time.monotonic()
    proc = subprocess.Popen(args, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = WebUI(url, data_dir, log_path, checkpoint, 0.0, proc, host_version(root))
    if startup_timeout is None:
        startup_timeout = float(os.environ.get("SD_WEBUI_STARTUP_TIMEOUT", "300"))
    try:
        deadline = start + startup_timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"WebUI exited with {proc.returncode} during start-up:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"WebUI did not answer on {url} in time:\n{server.log_tail()}")
            if _ready(server, ui):
                break
            time.sleep(0.5)
        # the model loads in a background thread after the server starts; the first request
        # that needs it waits for it, so one tiny generation makes the start-up complete
        server.txt2img(prompt="warm-up", steps=1)
        server.startup_s = time.monotonic() - start
        server.startup_log_bytes = log_path.stat().st_size
        print(
            f"\n[host] A1111 {server.version} at {root}; checkpoint {checkpoint.name}; "
            f"started in {server.startup_s:.1f} s"
        )
        yield server
    finally:
        try:
            server.request("POST", "/sdapi/v1/server-stop", {}, timeout=5)
        except OSError:
            pass
        _stop(proc)
        log.close()


@pytest.fixture(scope="session")
def webui(tmp_path_factory) -> WebUI:
    root = webui_root()
    checkpoint = _find_checkpoint(root)
    with launch_webui(root, checkpoint, tmp_path_factory.mktemp("webui-data")) as server:
        yield server
