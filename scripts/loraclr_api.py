"""API routes: ``POST /loraclr/v1/merge`` (the merge tab's parameters as JSON) and ``GET /loraclr/v1/health``.

The body and its defaults are documented in README.md ("API"); errors answer ``{"detail": message}``
with 400 (bad value), 404 (unknown LoRA or checkpoint) or 409 (output exists, or interrupted).
The merge runs under the WebUI's queue lock with ``shared.state`` begun and ended, like
``/sdapi/v1/txt2img``, so ``/sdapi/v1/interrupt`` stops it and the progress API reports it.
"""

from __future__ import annotations

import logging
from typing import Any

from modules import call_queue, script_callbacks, sd_models, shared

from lib_loraclr.errors import Interrupted, LoraClrError
from lib_loraclr.merge import request as mr
from lib_loraclr.merge.options import METHODS
from lib_loraclr.webui.merge_job import WebUIHost, run_merge

log = logging.getLogger(__name__)


def _webui() -> WebUIHost:
    import networks  # the built-in Lora extension's module; loaded after extensions' scripts

    return WebUIHost(shared, sd_models, networks)


BODY_FIELDS = frozenset(
    (
        "base",
        "loras",
        "method",
        "output_name",
        "overwrite",
        "dtype",
        "lora_rank",
        "params",
        "max_memory",
        "estimate",
    )
)


def request_from_body(body: Any) -> mr.MergeRequest:
    """The JSON body -> a validated request (every problem a 400 with a message)."""
    if not isinstance(body, dict):
        raise mr.MergeRequestError(
            'the body must be a JSON object, e.g. {"loras": [{"name": "a"}], "output_name": "x"}'
        )
    unknown = sorted(set(body) - BODY_FIELDS)
    if unknown:
        raise mr.MergeRequestError(
            f"unknown field(s) {unknown}; the body's fields are {', '.join(sorted(BODY_FIELDS))} "
            "(README.md, section API)"
        )
    loras = body.get("loras") or []
    if not isinstance(loras, list) or not all(isinstance(e, dict) for e in loras):
        raise mr.MergeRequestError(
            '\'loras\' must be a list of objects like {"name": "corgi", "weight": 1.0, "concept": null}'
        )
    params = body.get("params") or {}
    if not isinstance(params, dict):
        raise mr.MergeRequestError("'params' must be an object, e.g. {\"iterations\": 50}")
    opts = _webui()
    return mr.build_request(
        loras,
        str(body.get("output_name") or ""),
        base=body.get("base"),
        method=body.get("method") or opts.default_method(),
        overwrite=body.get("overwrite") is True,
        dtype=body.get("dtype") or opts.default_dtype(),
        lora_rank=body.get("lora_rank", 0),
        params=params,
        max_memory=body.get("max_memory"),
        estimate=body.get("estimate") is True,
    )


def merge_endpoint(body: Any) -> dict:
    """Validate, then merge under the queue lock (one job at a time, as the WebUI's own API)."""
    from fastapi import HTTPException

    try:
        request = request_from_body(body)
        with call_queue.queue_lock:
            shared.state.begin(job="loraclr_merge")
            try:
                return run_merge(request, _webui())
            finally:
                shared.state.end()
    except mr.MergeRequestError as error:
        raise HTTPException(status_code=error.status, detail=str(error)) from None
    except Interrupted:
        raise HTTPException(
            status_code=409, detail="merge interrupted; nothing was written and the loaded model is unchanged"
        ) from None
    except LoraClrError as error:
        raise HTTPException(status_code=400, detail=str(error)) from None


def health() -> dict:
    from lib_loraclr import __version__

    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    return {
        "ok": True,
        "version": __version__,
        "methods": list(METHODS),
        "loaded_model": getattr(info, "title", None),
    }


def on_app_started(_demo: Any, app: Any) -> None:
    from fastapi import Body

    def merge(body: Any = Body(...)) -> dict:  # noqa: B008 - FastAPI's idiom; Any: a non-object body gets our 400
        return merge_endpoint(body)

    app.add_api_route("/loraclr/v1/health", health, methods=["GET"])
    app.add_api_route("/loraclr/v1/merge", merge, methods=["POST"])


script_callbacks.on_app_started(on_app_started)
