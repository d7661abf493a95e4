"""Unpaired halves across restarts: `PayloadSink.close()` spills the halves still waiting for their
other half to `<root>/_pending/`, and the next sink on the same root takes them back on start, so a
call whose request arrived before a restart and its response after is still one row."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime

import storage
from monitoring import windows
from monitoring.events import Half, parse_event

log = logging.getLogger("flywheel.monitoring")


def spill(root: str, halves: list[tuple[str, Half]], write: Callable[[str, bytes], object]) -> str:
    """Write `halves` (event id, half) as one JSON file under `<root>/_pending/` with `write(uri,
    bytes)`; their waiting time is kept as a wall-clock arrival. Returns the file's URI."""
    now_wall, now = time.time(), time.monotonic()
    records = [{"id": event_id, "headers": half.headers, "body": half.body.decode("utf-8", "replace"),
                "arrived": now_wall - (now - half.arrived)} for event_id, half in halves]
    uri = storage.join(root, windows.PENDING, f"{datetime.now(UTC):%Y%m%dT%H%M%S%f}.json")
    write(uri, json.dumps(records).encode())
    return uri


def restore(root: str, take: Callable[[str, Half], object]) -> int:
    """Hand every spilled half under `root` to `take(event id, half)` (their waiting time counts on)
    and remove its file; returns how many files were restored. A file that cannot be read is left
    and logged, and an unreachable store is logged: neither stops a sink from starting."""
    try:
        fs, path = storage.filesystem(storage.join(root, windows.PENDING))
        files = sorted(fs.glob(f"{path.rstrip('/')}/*.json"))
    except Exception as err:
        log.warning("payload sink: cannot list unpaired events to restore: %s", err)
        return 0
    now_wall, now = time.time(), time.monotonic()
    for file in files:
        try:
            with fs.open(file, "rb") as handle:
                records = json.loads(handle.read())
            for record in records:
                half = parse_event(record["headers"], record["body"].encode())
                half.arrived = now - max(0.0, now_wall - float(record["arrived"]))
                take(record["id"], half)
            fs.rm(file)
        except Exception as err:
            log.error("payload sink: cannot restore unpaired events from %s: %s", file, err)
    return len(files)
