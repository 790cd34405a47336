"""``pipeq bulk status ID`` and ``pipeq bulk cancel ID``: a bulk job seen from another shell."""

from __future__ import annotations

import json
import os
import socket
import sys
import time

from pipeq.bulk.run import read_state
from pipeq.client import Client
from pipeq.core.config import Settings
from pipeq.errors import JobNotFound
from pipeq.job import Job
from pipeq.ops.exits import Exit


def bulk_status(settings: Settings, bulk_id: str, as_json: bool) -> int:
    """``pipeq bulk status ID``: state, progress, rate and chunks in flight of a bulk job."""
    client = Client.for_settings(settings)
    state = read_state(client.redis, client.keys.bulk(bulk_id))
    if not state:
        print(f"pipeq bulk status: no bulk job {bulk_id} (never started, or its record "
              "expired)", file=sys.stderr)
        return Exit.FAILED
    done, total = int(state.get("done", 0)), int(state.get("total", 0))
    elapsed = float(state.get("updated_at", 0)) - float(state.get("session_started", 0))
    rate = (done - int(state.get("session_done", 0))) / elapsed if elapsed > 0 else 0.0
    report = {
        "bulk_id": bulk_id, "state": state.get("state"), "total": total, "done": done,
        "producer_alive": _producer_alive(state),
        "failed": int(state.get("failed", 0)),
        "chunks_in_flight": sum(k.startswith("chunk:") for k in state),
        "cancel_requested": state.get("cancel") == "1",
        "inputs_per_s": round(rate, 1), "eta_s": round((total - done) / rate, 1) if rate else None,
        "updated_s_ago": round(time.time() - float(state.get("updated_at", time.time())), 1),
        "route": state.get("route"), "params": json.loads(state.get("params") or "{}"),
        "input": state.get("input"), "output": state.get("output"),
        "producer": f"pid {state.get('pid')} on {state.get('host')}",
    }
    if as_json:
        print(json.dumps(report, indent=2))
        return Exit.OK
    percent = 100 * done / total if total else 100.0
    print(f"bulk {bulk_id}: {report['state']}, {done} of {total} answered ({percent:.1f}%), "
          f"{report['failed']} failed, {report['chunks_in_flight']} chunks in flight")
    if report["producer_alive"] is False and report["state"] == "running":
        print(f"  its producer ({report['producer']}) is gone: run the same command again "
              "to resume it")
    print(f"  {report['route']}  {report['input']} -> {report['output']}")
    eta = f", ETA {report['eta_s']}s" if report["eta_s"] is not None else ""
    print(f"  {report['inputs_per_s']} inputs/s{eta}; updated {report['updated_s_ago']}s ago by "
          f"{report['producer']}")
    return Exit.OK


def _producer_alive(state: dict[str, str]) -> bool | None:
    """Whether the recorded producer process still runs (None: it runs on another host)."""
    if state.get("host") != socket.gethostname() or not state.get("pid", "").isdigit():
        return None
    try:
        os.kill(int(state["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def bulk_cancel(settings: Settings, bulk_id: str) -> int:
    """``pipeq bulk cancel ID``: the running command stops scheduling; queued chunk jobs end."""
    client = Client.for_settings(settings)
    key = client.keys.bulk(bulk_id)
    state = read_state(client.redis, key)
    if not state:
        print(f"pipeq bulk cancel: no bulk job {bulk_id}", file=sys.stderr)
        return Exit.FAILED
    # The flag first: the running command must see it before its jobs come back cancelled.
    client.redis.hset(key, "cancel", "1")
    if state.get("state") != "running" or _producer_alive(state) is False:
        client.redis.hset(key, "state", "cancelled")  # no running command will record it
    job_ids = [j for name, value in state.items() if name.startswith("chunk:")
               for j, _ in json.loads(value)]
    cancelled = sum(_cancel(client, job_id) for job_id in job_ids)
    print(f"bulk {bulk_id}: cancel requested; {cancelled} queued chunk job(s) cancelled, "
          f"{len(job_ids) - cancelled} already running or done")
    return Exit.OK


def _cancel(client: Client, job_id: str) -> bool:
    """Cancel a chunk job; False when it already ran (its record may be gone: written)."""
    try:
        return Job(client, job_id).cancel()
    except JobNotFound:
        return False
