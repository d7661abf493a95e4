"""Payload sink ingest: events/s of `python -m monitoring.service` under wrk, and zero acknowledged
events lost across a SIGTERM mid-stream.

    .venv/bin/python benchmarks/monitoring_sink.py [--seconds 10] [--clients 1,4,16] [--quick]

The events are the transformer's: the CloudEvent headers `serving/payload.py` sends
(`PayloadLogger.headers`), a one-row v1 request of the reference task as the client sends it, and
the v1 response `FeatureCodec.to_v1` makes. A wrk Lua script POSTs them to /events as
request/response pairs with unique `ce-id`s (thread id + counter); each wrk thread has one
connection, so its responses come back in its requests' order and the script knows, per pair,
whether both events were acknowledged (2xx).

Per run (client count): a fresh monitor on a fresh root (pinned to the server core, wrk to the
load core), wrk for `--seconds` + a margin; the rate is the server's own count of accepted events
(`flywheel_monitor_events_total`, code 202) over the measured span (after a 1 s warm-up), read from
/metrics. Then SIGTERM while wrk is still sending: the monitor refuses (503) or no longer hears the
rest, flushes, spills unpaired halves to `_pending/`, and exits. The check: rows on disk
(`read_window`) == pairs wrk saw acknowledged twice, and unpaired halves kept == pairs
acknowledged once. A last run uses a tiny buffer (64 events), so 503 backpressure happens all the
time, under the same check. Also reported: server CPU ms per event, flush latency (mean), wrk's
latency percentiles, and `PayloadSink.accept` alone in-process (no HTTP) for the split.

Results go to benchmarks/results/monitoring_sink.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"
NAME, VERSION = "credit", "bench-1"
SERVER_CORE, LOAD_CORE = 0, 1

WRK_SCRIPT = r"""
local threads = {}
local request_headers = %(request_headers)s
local response_headers = %(response_headers)s
local request_body = [==[%(request_body)s]==]
local response_body = [==[%(response_body)s]==]

function setup(thread)
  thread:set("tid", #threads)
  table.insert(threads, thread)
end

function init(args)
  k, phase, request_ok = 0, 0, false
  pairs_ok, halves, non2xx, first_bad = 0, 0, 0, 0
end

local function with_id(base, id)
  local h = {}
  for name, value in pairs(base) do h[name] = value end
  h["ce-id"] = id
  return h
end

function request()
  local id = "%(prefix)s-" .. tid .. "-" .. k
  if phase == 0 then
    return wrk.format("POST", "/events", with_id(request_headers, id), request_body)
  end
  return wrk.format("POST", "/events", with_id(response_headers, id), response_body)
end

function response(status, headers, body)
  local ok = status >= 200 and status < 300
  if not ok then
    non2xx = non2xx + 1
    if first_bad == 0 then first_bad = status end
  end
  if phase == 0 then
    request_ok, phase = ok, 1
  else
    if request_ok and ok then pairs_ok = pairs_ok + 1 elseif request_ok or ok then halves = halves + 1 end
    phase, k = 0, k + 1
  end
end

function done(summary, latency, requests)
  local p, h, bad, first = 0, 0, 0, 0
  for _, t in ipairs(threads) do
    p = p + t:get("pairs_ok")
    h = h + t:get("halves")
    bad = bad + t:get("non2xx")
    if first == 0 then first = t:get("first_bad") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %%d, "duration_us": %%d, "pairs_ok": %%d, "halves": %%d, "non2xx": %%d, ' ..
    '"first_bad_status": %%d, "connect": %%d, "read": %%d, "write": %%d, "timeout": %%d, ' ..
    '"p50_us": %%d, "p99_us": %%d, "p999_us": %%d, "max_us": %%d}\n',
    summary.requests, summary.duration, p, h, bad, first, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9), latency.max))
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PIN = False  # --pin: the monitor on core 0, wrk on core 1 (off by default: neighbours on a shared core starve it)


def pinned(command: list[str], core: int) -> list[str]:
    if PIN and shutil.which("taskset") and os.cpu_count() and os.cpu_count() > core:
        return ["taskset", "-c", str(core), *command]
    return command


def events() -> tuple[dict, bytes, dict, bytes]:
    """The transformer's request and response events of one one-row v1 call (headers without ce-id)."""
    import numpy as np

    from model.labels import LabelMapping
    from model.preprocessing import Preprocessor
    from serving.payload import REQUEST_TYPE, RESPONSE_TYPE, Event, PayloadLogger
    from serving.transform import FeatureCodec
    from stages.dataset import REFERENCE_CATEGORICAL, REFERENCE_NUMERIC, ReferenceTask

    frame = ReferenceTask(rows=500, seed=1).generate()
    columns = [*REFERENCE_NUMERIC, *REFERENCE_CATEGORICAL]
    codec = FeatureCodec(Preprocessor.fit(frame, list(REFERENCE_NUMERIC), list(REFERENCE_CATEGORICAL)),
                         LabelMapping(0, 1))
    record = json.loads(json.dumps(frame[columns].iloc[:1].astype(object).to_dict("records")))
    request = json.dumps({"instances": record}).encode()
    response = json.dumps(codec.to_v1(np.array([0.27]), NAME, VERSION)).encode()
    logger = PayloadLogger("http://monitor/events", model_name=NAME)
    source = f"http://transformer:8080/v1/models/{NAME}:predict"
    heads = []
    for kind, body in ((REQUEST_TYPE, request), (RESPONSE_TYPE, response)):
        headers = logger.headers(Event(kind, "x", source, body))
        headers.pop("ce-id")
        heads.append(headers)
    return heads[0], request, heads[1], response


def lua_table(headers: dict) -> str:
    return "{" + ", ".join(f'["{k}"] = "{v}"' for k, v in headers.items()) + "}"


class Monitor:
    def __init__(self, root: Path, log: Path, *args: str):
        import psutil

        self.port, self.log = free_port(), log
        command = [sys.executable, "-m", "monitoring.service", "--root", str(root), "--port", str(self.port),
                   "--host", "127.0.0.1", "--log-level", "info", *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        with open(log, "wb") as out:
            self.process = subprocess.Popen(pinned(command, SERVER_CORE), cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT)
        self.ps = psutil.Process(self.process.pid)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout: float = 60) -> Monitor:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"monitor exited {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise SystemExit("monitor not ready")

    def metrics(self) -> dict[str, float]:
        import httpx

        out = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("flywheel_monitor_") and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system


def accepted(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("flywheel_monitor_events_total{") and 'code="202"' in k)


def run_once(label: str, clients: int, seconds: float, script_text: str, work: Path, *server_args: str) -> dict:
    from monitoring import windows
    from monitoring.windows import read_window

    root, log = work / f"{label}-windows", work / f"{label}.log"
    monitor = Monitor(root, log, *server_args).wait()
    script = work / f"{label}.lua"
    script.write_text(script_text.replace("%(prefix)s", label))
    margin = 120.0  # wrk is stopped (SIGINT: it still reports) once the monitor has exited
    wrk = subprocess.Popen(pinned(["wrk", "-t", str(clients), "-c", str(clients), "-d", f"{round(seconds + margin)}s",
                                   "--timeout", "10s", "-s", str(script), monitor.url + "/events"], LOAD_CORE),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # warm-up
    m0, c0, t0 = monitor.metrics(), monitor.cpu(), time.monotonic()
    time.sleep(seconds)
    m1, c1, t1 = monitor.metrics(), monitor.cpu(), time.monotonic()
    monitor.process.send_signal(signal.SIGTERM)  # mid-stream: wrk is still sending
    term_at = time.monotonic()
    # Once uvicorn runs the app's shutdown its connections are closed and every answer is sent:
    # let wrk read the last ones, then stop it (its reconnect storm would only starve the monitor).
    deadline = term_at + 120
    while "Waiting for application shutdown" not in log.read_text() and monitor.process.poll() is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"the monitor did not shut down:\n{log.read_text()[-3000:]}")
        time.sleep(0.02)
    drained = time.monotonic() - term_at
    time.sleep(0.5)
    wrk.send_signal(signal.SIGINT)
    out, err = wrk.communicate(timeout=60)
    code = monitor.process.wait(timeout=120)
    shutdown = time.monotonic() - term_at
    line = next((x for x in out.splitlines() if x.startswith("WRK_RESULT ")), None)
    if line is None:
        raise SystemExit(f"wrk failed ({wrk.returncode}):\n{out}\n{err}")
    raw = json.loads(line[len("WRK_RESULT "):])
    rows = len(read_window(str(root)))
    closed = next((json.loads(x.split("payload sink closed: ", 1)[1]) for x in log.read_text().splitlines()
                   if "payload sink closed: " in x), {})
    pending = sum(len(json.loads(f.read_text())) for f in (root / windows.PENDING).glob("*.json"))
    events = accepted(m1) - accepted(m0)
    flushes = m1.get("flywheel_monitor_flush_seconds_count", 0) - m0.get("flywheel_monitor_flush_seconds_count", 0)
    flush_sum = m1.get("flywheel_monitor_flush_seconds_sum", 0) - m0.get("flywheel_monitor_flush_seconds_sum", 0)
    refused = sum(v for k, v in m1.items() if k.startswith("flywheel_monitor_events_total{") and 'code="503"' in k)
    result = {
        "config": label, "clients": clients, "server_args": list(server_args), "measured_seconds": round(t1 - t0, 2),
        "events_per_s": round(events / (t1 - t0), 1), "pairs_per_s": round(events / 2 / (t1 - t0), 1),
        "server_cpu_ms_per_event": round(1e3 * (c1 - c0) / events, 4) if events else None,
        "server_cpu_share": round(100 * (c1 - c0) / (t1 - t0), 1),
        "flushes": int(flushes), "flush_mean_ms": round(1e3 * flush_sum / flushes, 2) if flushes else None,
        "wrk_p50_ms": raw["p50_us"] / 1e3, "wrk_p99_ms": raw["p99_us"] / 1e3, "wrk_p999_ms": raw["p999_us"] / 1e3,
        "wrk_max_ms": raw["max_us"] / 1e3, "wrk_responses": raw["requests"],
        "503s_seen_by_wrk": raw["non2xx"], "first_bad_status": raw["first_bad_status"],
        "socket_errors_after_sigterm": raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        "server_503_total": int(refused), "exit_code": code, "connections_closed_seconds": round(drained, 2),
        "shutdown_seconds": round(shutdown, 2),
        "pairs_acknowledged": raw["pairs_ok"], "halves_acknowledged": raw["halves"],
        "rows_on_disk": rows, "unpaired_kept": pending, "unpaired_evicted": closed.get("evicted"),
        "unpaired_expired": closed.get("expired"),
    }
    # Every pair acknowledged twice is rows on disk; every half acknowledged once is kept in
    # _pending/ or was evicted/expired (counted) as a half that will never pair.
    result["zero_lost"] = code == 0 and rows == raw["pairs_ok"]
    result["halves_accounted"] = raw["halves"] == pending + closed.get("evicted", 0) + closed.get("expired", 0)
    print(f"  {label:<14} {clients:>3} clients  {result['events_per_s']:8.0f} events/s  "
          f"CPU {result['server_cpu_ms_per_event']} ms/event  p99 {result['wrk_p99_ms']:.2f} ms  "
          f"503s {raw['non2xx']}  acked pairs {raw['pairs_ok']}  rows {rows}  "
          f"halves {raw['halves']} (kept {pending}, evicted {closed.get('evicted')}, expired {closed.get('expired')})  "
          f"exit {code}  {'ZERO LOST' if result['zero_lost'] else 'LOSS OR MISMATCH'}", flush=True)
    return result


def in_process(seconds: float, request_headers: dict, request: bytes, response_headers: dict,
               response: bytes, work: Path) -> dict:
    """`PayloadSink.accept` alone: pairs/s without HTTP (the background flush running as in the service)."""
    from monitoring.sink import PayloadSink
    from specs.monitoring import SinkSpec

    root = str(work / "in-process")
    sink = PayloadSink(root, SinkSpec(root=root))
    k, started = 0, time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(200):
            event_id = f"p-{k}"
            request_headers["ce-id"] = response_headers["ce-id"] = event_id
            first, second = sink.accept(request_headers, request), sink.accept(response_headers, response)
            if first.status != 202 or second.status != 202:
                time.sleep(0.001)
            k += 1
    elapsed = time.perf_counter() - started
    sink.close()
    return {"events_per_s": round(2 * k / elapsed, 1), "pairs": k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--quick", action="store_true", help="3 s runs at 4 clients")
    parser.add_argument("--pin", action="store_true", help="monitor on core 0, wrk on core 1 (taskset)")
    args = parser.parse_args()
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    seconds = 3.0 if args.quick else args.seconds
    clients = [4] if args.quick else [int(c) for c in args.clients.split(",")]
    request_headers, request, response_headers, response = events()
    script = WRK_SCRIPT % {"request_headers": lua_table(request_headers),
                           "response_headers": lua_table(response_headers), "request_body": request.decode(),
                           "response_body": response.decode(), "prefix": "%(prefix)s"}
    global PIN
    PIN = args.pin
    where = f"monitor on core {SERVER_CORE}, wrk on core {LOAD_CORE}" if PIN else "unpinned"
    print(f"cores {os.cpu_count()}, load {os.getloadavg()}; {where}")
    results = []
    with tempfile.TemporaryDirectory(prefix="sink-bench-") as tmp:
        work = Path(tmp)
        for n in clients:
            results.append(run_once(f"default-c{n}", n, seconds, script, work))
        results.append(run_once("tiny-buffer", max(clients), seconds, script, work, "--buffer-events", "64"))
        accept_only = in_process(min(seconds, 5.0), dict(request_headers), request, dict(response_headers),
                                 response, work)
    print(f"  in-process PayloadSink.accept: {accept_only['events_per_s']:.0f} events/s (no HTTP)")
    summary = {"cores": os.cpu_count(), "loadavg": os.getloadavg(), "pinned": PIN, "runs": results,
               "accept_in_process": accept_only, "zero_lost_everywhere": all(r["zero_lost"] for r in results),
               "halves_accounted_everywhere": all(r["halves_accounted"] for r in results)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitoring_sink.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"zero acknowledged events lost in every run: {summary['zero_lost_everywhere']}; "
          f"results in {RESULTS / 'monitoring_sink.json'}")
    if not summary["zero_lost_everywhere"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
