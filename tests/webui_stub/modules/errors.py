"""Mirror of modules.errors.report: the real host logs exceptions of callbacks and carries on."""

import logging
import sys

reported = []  # (message, exception) for tests; the real module prints a traceback instead


def report(message, *, exc_info=False):
    error = sys.exc_info()[1] if exc_info else None
    reported.append((message, error))
    logging.getLogger("webui_stub").error("%s", message, exc_info=exc_info)


def display(e, task, *, full_traceback=False):
    reported.append((task, e))
