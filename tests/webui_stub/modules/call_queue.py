"""Mirror of modules.call_queue (1.8.0): one job at a time, ``task(...)`` ids, errors as HTML, stats appended.

As in the real host, ``wrap_gradio_call`` appends a "Time taken" block to the LAST output, so the
last output of a queued click must be HTML text, and ``extra_outputs`` must fill every other output.
"""

import html
import threading
import time
from functools import wraps

from modules import errors, progress, shared

queue_lock = threading.Lock()  # the real one is a FIFO lock; the same context-manager interface


def wrap_queued_call(func):
    def f(*args, **kwargs):
        with queue_lock:
            res = func(*args, **kwargs)
        return res

    return f


def wrap_gradio_gpu_call(func, extra_outputs=None):
    @wraps(func)
    def f(*args, **kwargs):
        if args and type(args[0]) == str and args[0].startswith("task(") and args[0].endswith(")"):  # noqa: E721 - as upstream
            id_task = args[0]
            progress.add_task_to_queue(id_task)
        else:
            id_task = None
        with queue_lock:
            shared.state.begin(job=id_task)
            progress.start_task(id_task)
            try:
                res = func(*args, **kwargs)
                progress.record_results(id_task, res)
            finally:
                progress.finish_task(id_task)
            shared.state.end()
        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(func, extra_outputs=None, add_stats=False):
    @wraps(func)
    def f(*args, extra_outputs_array=extra_outputs, **kwargs):
        t = time.perf_counter()
        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            errors.report("Error completing request", exc_info=True)
            shared.state.job = ""
            shared.state.job_count = 0
            if extra_outputs_array is None:
                extra_outputs_array = [None, ""]
            res = extra_outputs_array + [
                f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"
            ]
        shared.state.skipped = False
        shared.state.interrupted = False
        shared.state.stopping_generation = False
        shared.state.job_count = 0
        if not add_stats:
            return tuple(res)
        elapsed = time.perf_counter() - t
        res[-1] += (
            f"<div class='performance'><p class='time'>Time taken: <wbr><span class='measurement'>{elapsed:.1f} sec.</span></p></div>"
        )
        return tuple(res)

    return f
