"""Flow runs of a run folder whose process died (SIGKILL, power loss) stay RUNNING in Prefect: as the next flow
run of the same run folder starts, it marks them CRASHED. Each flow run tags itself with its run folder and its
process (`dmd-process:host:pid`; the infrastructure pid is left to workers, which cancel through it); a RUNNING
one on this host whose process is gone has crashed."""
from __future__ import annotations

import hashlib
import os
import socket

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed


PROCESS = "dmd-process:"


def run_tag(run_url: str) -> str:
    """The Prefect tag of every flow run working on the run folder `run_url`."""
    return "dmd-run-" + hashlib.sha256(run_url.encode()).hexdigest()[:16]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def claim_run(run_url: str) -> list[str]:
    """Tag the current flow run with its run folder; mark this host's dead RUNNING flow runs of it CRASHED.
    Returns the names of the flow runs marked."""
    me, tag, host = flow_run.get_id(), run_tag(run_url), socket.gethostname()
    if me is None:
        return []
    marked = []
    with get_client(sync_client=True) as client:
        current = client.read_flow_run(me)
        client.update_flow_run(me, tags=sorted({*current.tags, tag, f"{PROCESS}{host}:{os.getpid()}"}))
        running = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.RUNNING])),
            tags=FlowRunFilterTags(all_=[tag])))
        for other in running:
            process = next((t[len(PROCESS):] for t in other.tags if t.startswith(PROCESS)), "")
            owner, _, pid = process.rpartition(":")
            if str(other.id) == str(me) or owner != host or not pid.isdigit() or _alive(int(pid)):
                continue
            client.set_flow_run_state(other.id, Crashed(message=f"process {pid} on {host} is gone; marked "
                                                                f"crashed by flow run {current.name}"), force=True)
            marked.append(other.name)
    return marked
