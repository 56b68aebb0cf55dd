"""The temporary Prefect server of a `dmd run` without PREFECT_API_URL: started before the flow, with a generous
start-up timeout and one retry, so a busy machine does not fail the run (Prefect's own default is 20 s)."""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Optional

TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
DEFAULT_TIMEOUT_S = 300  # a 2-core machine with two busy processes took over 60 s
TRIES = 2


class ServerStartError(RuntimeError):
    """The temporary server did not answer; the message says what to do instead."""


def startup_timeout() -> int:
    """The user's PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS when set, else DEFAULT_TIMEOUT_S."""
    value = os.environ.get(TIMEOUT_ENV, "").strip()
    if not value:
        return DEFAULT_TIMEOUT_S
    if not value.isdigit() or int(value) < 1:  # Prefect itself reads it as a whole number of seconds
        raise ServerStartError(f"{TIMEOUT_ENV}={value!r}: give a whole number of seconds (at least 1)")
    return int(value)


def _exit(signum: int, frame) -> None:
    sys.exit(128 + signum)


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill`, a scheduler stopping the job) exit through SystemExit, so that atexit handlers run and
    the temporary server stops with its run instead of outliving it. Leaves a handler someone else set alone."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit)


def start_temporary_server() -> Optional[str]:
    """With no PREFECT_API_URL, start Prefect's temporary server (the one a flow run would start on its own) and
    return its API URL; None when an API URL is set. Raises ServerStartError after TRIES time-outs."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    timeout, error = startup_timeout(), None
    exit_on_sigterm()  # Prefect stops its server at exit; a plain SIGTERM would skip that and orphan it
    for _ in range(TRIES):
        server = SubprocessASGIServer()  # Prefect's process-wide instance: the flow's client finds it running
        try:
            server.start(timeout=timeout)
            return server.api_url
        except RuntimeError as err:
            error = err
            server.stop()  # the process that did not answer; the next try starts a new one on a new port
    raise ServerStartError(
        f"the temporary Prefect server did not answer within {timeout} s ({TRIES} tries: "
        f"{str(error).split('.')[0]}); start one with `prefect server start` and set "
        f"PREFECT_API_URL=http://127.0.0.1:4200/api, or raise {TIMEOUT_ENV}")
