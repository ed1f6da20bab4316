"""Mirror of modules.call_queue: one job at a time, shared.state begun/ended around it."""

import html
import threading
from functools import wraps

from modules import shared

queue_lock = threading.Lock()


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            return func(*args, **kwargs)

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        with queue_lock:
            shared.state.begin(job="stub")
            try:
                return func(*args, **kwargs)
            finally:
                shared.state.end()

    return wrap_gradio_call(f, extra_outputs=extra_outputs)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    @wraps(func)
    def f(*args, **kwargs):
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            res = list(extra_outputs or [None, ""]) + [f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]
        shared.state.skipped = False
        shared.state.interrupted = False
        return tuple(res)

    return f
