"""Serving speed under a real load generator: the raw forward pass, stock KServe and ours, in one run.

    .venv/bin/python benchmarks/serving.py [--duration 10] [--rounds 3] [--clients 1,4,16] [--soak 60]
                                           [--quick] [--stock-rest-protocol v1|v2]

A model is trained in-process in seconds (the reference task, 2k rows, 2 epochs) and served on
loopback. Each configuration gets a warm-up, then closed-loop `wrk` runs (Debian's wrk 4, a Lua
script for the POST body, p50/p99 and non-2xx counts through its `done()` hook) per client count,
one request = one row. A measurement's --duration is split into --rounds interleaved rounds (every
configuration and client count once per round, so the configurations see the same neighbours)
and its best round is reported, as benchmarks/training.py does: on shared cores a neighbour's
burst only ever slows a round down. Configurations:

1. raw model forward: `TrainedModel.predict_arrays` on a 1-row batch in this process, calls/s.
2. stock KServe predictor (benchmarks/stock_kserve.py): the same forward pass behind a minimal
   `kserve.Model` with KServe's default handling, v1 JSON tensors in.
3. stock chain over REST: a minimal KServe transformer (our `FeatureCodec` for pre/postprocess,
   KServe's default `InferenceRESTClient` hop, v1 by default) in front of the stock predictor.
4. stock chain over grpc-v2: the same transformer with KServe's `InferenceGRPCClient` hop.
5. our predictor (`python -m serving.predictor`), the same v1 JSON tensors in.
6. our one process (`python -m serving.single`, `serving.topology: single`): raw records in, the
   transformer's FeatureCodec and the predictor's forward pass in one ModelServer process.
7. our chain: `serving.transformer` (grpc-v2 hop, raw tensor contents) in front of our predictor.

Chains take v1 raw records (`{"instances": [row]}`) and answer labels and probabilities; every
configuration's answer is checked against the raw forward pass before it is measured, so they all
do the same work. Servers run with OMP_NUM_THREADS=1 and are pinned with taskset to the server
core(s), wrk (and this process) to the load core(s); with 2 cores a chain's two processes share
core 0, as a collocated pod with one CPU would. Per run the servers' CPU time per request (per
process for a chain), wrk's CPU share and each core's busy share are recorded too: CPU ms/request
moves far less than throughput when a neighbour takes the core (it still rises when the sibling
core is busy), so it is the figure to compare across runs; the load average is printed with each.

Then a soak at 80% of the one-process server's peak throughput (the default topology) for --soak
seconds: wrk 4 has no fixed-rate mode (`-R` is wrk2's), so an open-loop generator (asyncio +
aiohttp, one request every 1/rate s whatever the answers do, latency from the scheduled send time)
drives it while the servers' RSS is sampled every second. Pass: zero errors, and memory flat =
the last sample within max(10%, 20 MB) of the sample after warm-up.

Targets (verdicts printed, benchmarks/serving_report.py): the one process's throughput >= 0.9x our
predictor alone at 16 clients (moonshot 1.0x), its p99 <= 20 ms at 16 clients and <= 10 ms at 4;
the same for our chain against 0.7x; our predictor's throughput not below the stock KServe
predictor's and its CPU per request not above it at any client count. Results go to
benchmarks/results/serving.json.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serving_report import SOAK_SHARE, print_soak, print_table, ratio_lines, verdicts  # noqa: E402
from tests.support import NotReady, free_port, wait_for_url  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NAME = "credit"
WARMUP_SOAK_SECONDS = 10.0  # RSS after this much of the soak is the "after warm-up" reference
FLAT_SHARE, FLAT_BYTES = 0.10, 20 << 20

WRK_SCRIPT = r"""
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%(body)s]==]

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  non2xx = 0
  first_status = 0
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
    if first_status == 0 then first_status = status end
  end
end

function done(summary, latency, requests)
  local bad, first = 0, 0
  for _, t in ipairs(threads) do
    bad = bad + t:get("non2xx")
    if first == 0 then first = t:get("first_status") end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests": %%d, "duration_us": %%d, "non2xx": %%d, "first_bad_status": %%d, ' ..
    '"connect": %%d, "read": %%d, "write": %%d, "status": %%d, "timeout": %%d, ' ..
    '"p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "p999_us": %%d, "mean_us": %%.1f, "max_us": %%d}\n',
    summary.requests, summary.duration, bad, first, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.mean, latency.max))
end
"""


def cpu_list(cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def core_times() -> dict[int, tuple[int, int]]:
    """Per core (busy, total) jiffies from /proc/stat."""
    times = {}
    with open("/proc/stat") as stat:
        for line in stat:
            if line.startswith("cpu") and line[3].isdigit():
                name, *values = line.split()
                values = [int(v) for v in values]
                idle = values[3] + (values[4] if len(values) > 4 else 0)
                times[int(name[3:])] = (sum(values[:8]) - idle, sum(values[:8]))
    return times


def busy_shares(before: dict, after: dict, cores) -> dict[int, float]:
    shares = {}
    for core in sorted(cores):
        busy = after[core][0] - before[core][0]
        total = after[core][1] - before[core][1]
        shares[core] = round(100.0 * busy / total, 1) if total else 0.0
    return shares


# ---- the model and the bodies -----------------------------------------------------------------

def train_model(directory: Path):
    """A model trained in-process in seconds, as tests/serving/conftest.py does, and its frame."""
    from pipelines.arguments import train_spec
    from pipelines.config import load_settings
    from stages.dataset import ReferenceTask
    from storage.tables import write_table
    from training import train as entry
    from training.backends.jobs import entry_spec

    frame = ReferenceTask(rows=2000, seed=3).generate()
    data = write_table(frame, directory / "train.parquet")
    settings = load_settings("local", overrides={"training": {"hyperparameters": {"epochs": 2}}})
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RESTART_COUNT"):
        os.environ.pop(name, None)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        entry.train(str(data), str(directory / "model"), entry_spec(train_spec(settings), settings.dataset, None))
    return directory / "model", frame


def bodies(model_dir: Path, frame):
    """One raw record (the chains' v1 body), its tensors (the predictors' v1 body) and the tensors."""
    from serving.transform import FeatureCodec

    codec = FeatureCodec.from_model_dir(str(model_dir))
    part = frame[codec.columns].dropna().iloc[:1]
    record = json.loads(json.dumps(part.astype(object).to_dict("records")[0]))
    features = codec.from_v1({"instances": [record]})
    chain = json.dumps({"instances": [record]}).encode()
    predictor = json.dumps({"instances": [{"numeric": features.numeric[0].tolist(),
                                           "categorical": features.categorical[0].tolist()}]}).encode()
    return chain, predictor, features


# ---- the servers ------------------------------------------------------------------------------

class Server:
    """One server process, pinned, with its ports and log file."""

    def __init__(self, label: str, command: list[str], log_dir: Path, cpus):
        self.label, self.cpus = label, set(cpus) if cpus else None
        self.http_port, self.grpc_port = free_port(), free_port()
        self.log = log_dir / f"{label.replace(' ', '_')}.log"
        self.command = [sys.executable, *command, "--model_name", NAME,
                        "--http_port", str(self.http_port), "--grpc_port", str(self.grpc_port)]
        self.process: subprocess.Popen | None = None
        self.ps = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def pinned_command(self) -> list[str]:
        if self.cpus and shutil.which("taskset"):
            return ["taskset", "-c", cpu_list(self.cpus), *self.command]
        return self.command

    def start(self) -> Server:
        import psutil

        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        preexec = None
        if self.cpus and not shutil.which("taskset"):
            cpus = self.cpus
            preexec = lambda: os.sched_setaffinity(0, cpus)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(self.pinned_command(), cwd=ROOT, env=env, stdout=out,
                                            stderr=subprocess.STDOUT, preexec_fn=preexec)
        self.ps = psutil.Process(self.process.pid)  # taskset execs the server: same pid
        return self

    def wait(self, timeout: float = 120.0) -> Server:
        try:
            wait_for_url(f"{self.url}/v2/health/ready", self.process, timeout=timeout, what=self.label, tail=self.tail)
        except NotReady as err:
            raise SystemExit(str(err)) from None
        return self

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss(self) -> int:
        return self.ps.memory_info().rss

    def tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def check_answer(url: str, body: bytes, want: float, label: str) -> None:
    """One request: a 200 whose probability is the raw forward pass's (all configs do the same work)."""
    import httpx

    answer = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=30)
    if answer.status_code != 200:
        raise SystemExit(f"{label}: {answer.status_code} {answer.text[:500]}")
    data = answer.json()
    got = data.get("probabilities", data.get("predictions"))
    if not got or abs(float(got[0]) - want) > 1e-5:
        raise SystemExit(f"{label}: answered {str(data)[:300]}, expected probability {want:.6f}")


# ---- measurements -----------------------------------------------------------------------------

def raw_forward(model_dir: Path, features, seconds: float, cpus) -> dict:
    """In-process calls/s of `predict_arrays` on one row, pinned like the servers, one thread."""
    import numpy as np
    import torch

    from model.loader import load_model

    torch.set_num_threads(1)
    model = load_model(str(model_dir))
    numeric, categorical = features.numeric, features.categorical
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        for _ in range(500):
            model.predict_arrays(numeric, categorical)
        durations = []
        clock = time.perf_counter
        started = clock()
        deadline = started + seconds
        while True:
            t = clock()
            if t >= deadline:
                break
            model.predict_arrays(numeric, categorical)
            durations.append(clock() - t)
        elapsed = clock() - started
    finally:
        os.sched_setaffinity(0, before)
    us = np.asarray(durations) * 1e6
    return {"calls": len(durations), "calls_per_s": len(durations) / elapsed, "p50_us": float(np.percentile(us, 50)),
            "p99_us": float(np.percentile(us, 99)), "probability": float(model.predict_arrays(numeric, categorical)[0])}


def raw_codec(model_dir: Path, chain_body: bytes, seconds: float, cpus) -> dict:
    """In-process cost of the transformer's own work on one row: JSON parse, `FeatureCodec.from_v1`
    (validation + `Preprocessor.transform`), `to_v1` and the JSON answer, pinned like the servers."""
    import numpy as np
    import orjson

    from serving.transform import FeatureCodec

    codec = FeatureCodec.from_model_dir(str(model_dir))
    probabilities = np.asarray([0.25], dtype=np.float32)
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        parts = {"parse": 0.0, "from_v1": 0.0, "to_v1": 0.0, "dump": 0.0}
        clock, calls = time.perf_counter, 0
        for _ in range(200):
            codec.to_v1(probabilities, NAME, "v")
            codec.from_v1(orjson.loads(chain_body))
        deadline = clock() + seconds
        while clock() < deadline:
            t0 = clock()
            body = orjson.loads(chain_body)
            t1 = clock()
            codec.from_v1(body)
            t2 = clock()
            answer = codec.to_v1(probabilities, NAME, "v")
            t3 = clock()
            orjson.dumps(answer)
            t4 = clock()
            for key, value in (("parse", t1 - t0), ("from_v1", t2 - t1), ("to_v1", t3 - t2), ("dump", t4 - t3)):
                parts[key] += value
            calls += 1
    finally:
        os.sched_setaffinity(0, before)
    us = {key: 1e6 * value / calls for key, value in parts.items()}
    return {"calls": calls, "us_per_row": sum(us.values()), **{f"{key}_us": value for key, value in us.items()}}


class Wrk:
    """wrk runs with a generated Lua script, pinned to the load cores."""

    def __init__(self, script_dir: Path, cpus):
        self.script_dir, self.cpus = script_dir, set(cpus) if cpus else None
        self.threads = max(1, len(self.cpus) if self.cpus else 1)

    def command(self, url: str, script: Path, clients: int, seconds: float) -> list[str]:
        command = ["wrk", "-t", str(min(self.threads, clients)), "-c", str(clients), "-d", f"{max(1, round(seconds))}s",
                   "--timeout", "10s", "-s", str(script), url]
        if self.cpus and shutil.which("taskset"):
            command = ["taskset", "-c", cpu_list(self.cpus), *command]
        return command

    def run(self, url: str, body: bytes, clients: int, seconds: float, servers: list[Server]) -> dict:
        script = self.script_dir / f"post-{abs(hash(body))}.lua"
        if not script.exists():
            script.write_text(WRK_SCRIPT % {"body": body.decode()})
        cpu_before = {s.label: s.cpu_seconds() for s in servers}
        cores_before = core_times()
        load = loadavg()
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(self.command(url, script, clients, seconds), capture_output=True, text=True,
                              timeout=seconds + 60)
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cores_after = core_times()
        by_process = {s.label: s.cpu_seconds() - cpu_before[s.label] for s in servers}
        cpu = sum(by_process.values())
        wrk_cpu = (children_after.ru_utime - children.ru_utime) + (children_after.ru_stime - children.ru_stime)
        line = next((x for x in done.stdout.splitlines() if x.startswith("WRK_RESULT ")), None)
        if done.returncode != 0 or line is None:
            raise SystemExit(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        raw = json.loads(line[len("WRK_RESULT "):])
        seconds_run = raw["duration_us"] / 1e6
        socket_errors = raw["connect"] + raw["read"] + raw["write"] + raw["timeout"]
        return {"clients": clients, "requests": raw["requests"], "seconds": round(seconds_run, 3),
                "rps": raw["requests"] / seconds_run, "p50_ms": raw["p50_us"] / 1e3, "p90_ms": raw["p90_us"] / 1e3,
                "p99_ms": raw["p99_us"] / 1e3, "p999_ms": raw["p999_us"] / 1e3, "mean_ms": raw["mean_us"] / 1e3,
                "max_ms": raw["max_us"] / 1e3, "non2xx": raw["non2xx"], "first_bad_status": raw["first_bad_status"],
                "socket_errors": socket_errors, "errors": raw["non2xx"] + socket_errors,
                "server_cpu_ms_per_request": 1e3 * cpu / raw["requests"] if raw["requests"] else None,
                "server_cpu_ms_per_request_by_process": {k: 1e3 * v / raw["requests"] if raw["requests"] else None
                                                         for k, v in by_process.items()},
                "server_cpu_share": round(100.0 * cpu / seconds_run, 1),
                "wrk_cpu_share": round(100.0 * wrk_cpu / seconds_run, 1),
                "core_busy_percent": busy_shares(cores_before, cores_after, cores_after.keys()),
                "loadavg_before": load}


def measure(targets: list[tuple], wrk: Wrk, clients: list[int], seconds: float, warmup: float,
            rounds: int = 1) -> list[dict]:
    """Every target at every client count, interleaved and in rounds: each round runs every client
    count, each client count every configuration once (the order alternates), so a neighbour's
    burst on the shared cores lands on all configurations alike rather than on whichever ran then.
    A configuration's figure is its best round (highest req/s, with that round's latencies): a
    burst only ever slows a round down, so the best round is the servers' own speed; all rounds
    stay in the JSON (`rounds`), and the table shows their req/s spread.

    Args:
        targets: (label, url, body, servers whose CPU to count) per configuration.
        seconds: Per round.
    """
    for _label, url, body, procs in targets:
        wrk.run(url, body, max(clients), warmup, procs)  # warm-up, discarded
    runs: dict[tuple[str, int], list[dict]] = {}
    step = 0
    for r in range(rounds):
        for n in clients:
            for label, url, body, procs in (targets if step % 2 == 0 else targets[::-1]):
                row = {"config": label, "round": r + 1, **wrk.run(url, body, n, seconds, procs)}
                runs.setdefault((label, n), []).append(row)
                print(f"  round {r + 1}/{rounds}  {label:<30} {n:>3} clients  {row['rps']:7.0f} req/s  p50 "
                      f"{row['p50_ms']:6.2f} ms  p99 {row['p99_ms']:7.2f} ms  errors {row['errors']}  "
                      f"load {row['loadavg_before'][0]}", flush=True)
            step += 1
    order = {label: i for i, (label, *_rest) in enumerate(targets)}
    rows = []
    for _key, all_rounds in sorted(runs.items(), key=lambda item: (order[item[0][0]], item[0][1])):
        best = max(all_rounds, key=lambda row: row["rps"])
        rows.append({**best, "rps_min": min(x["rps"] for x in all_rounds), "rps_max": best["rps"],
                     "errors_all_rounds": sum(x["errors"] for x in all_rounds),
                     "rounds": [{k: v for k, v in x.items() if k != "config"} for x in all_rounds]})
    return rows


# ---- soak -------------------------------------------------------------------------------------

async def open_loop(url: str, body: bytes, rate: float, seconds: float, servers: list[Server],
                    max_in_flight: int = 512) -> dict:
    """Requests at a fixed rate whatever the answers do (open loop), latency from the scheduled
    send time (so a stall counts for every request it delays); RSS of `servers` every second."""
    import aiohttp
    import numpy as np

    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    in_flight: set = set()
    samples: list[dict] = []
    per_second: dict[int, int] = {}
    headers = {"content-type": "application/json"}

    def error(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1

    lags: list[float] = []
    connector = aiohttp.TCPConnector(limit=64, limit_per_host=64)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as session:
        cores_before, own_before = core_times(), time.process_time()
        start = loop.time()

        async def one(scheduled: float) -> None:
            try:
                async with session.post(url, data=body, headers=headers) as answer:
                    await answer.read()
                    if not 200 <= answer.status < 300:
                        error(f"HTTP {answer.status}")
                        return
            except Exception as err:
                error(type(err).__name__)
                return
            done = loop.time()
            latencies.append(done - scheduled)
            second = int(done - start)
            per_second[second] = per_second.get(second, 0) + 1

        async def sample() -> None:
            t0 = loop.time()
            while True:
                samples.append({"t": round(loop.time() - t0, 2), **{s.label: s.rss() for s in servers},
                                "cpu": {s.label: s.cpu_seconds() for s in servers}})
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample())
        # The generator's own pauses must not count against the server: a full collection over
        # everything imported (aiohttp, numpy, the benchmark) stalled this loop ~300 ms at 1,600 req/s,
        # the overdue sends then went out at once and hit max_in_flight. Frozen, it skips them.
        gc.collect()
        gc.freeze()
        total, i = int(rate * seconds), 0
        while i < total:
            due = start + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            lags.append(now - due)
            while i < total and start + i / rate <= now:
                if len(in_flight) >= max_in_flight:
                    error(f"not sent: {max_in_flight} requests already in flight (the servers fell behind)")
                else:
                    task = asyncio.create_task(one(start + i / rate))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                i += 1
        sent_for = loop.time() - start
        own_cpu, cores_after = time.process_time() - own_before, core_times()
        if in_flight:
            await asyncio.wait(list(in_flight), timeout=15)
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
        samples.append({"t": round(loop.time() - start, 2), **{s.label: s.rss() for s in servers},
                        "cpu": {s.label: s.cpu_seconds() for s in servers}})
    ms = np.asarray(latencies) * 1e3 if latencies else np.zeros(1)
    cpu_ms = {s.label: 1e3 * (samples[-1]["cpu"][s.label] - samples[0]["cpu"][s.label]) / max(1, len(latencies))
              for s in servers}
    full = [per_second[k] for k in sorted(per_second) if k < int(seconds)]
    return {"rate": rate, "seconds": seconds, "sent": total, "answered": len(latencies),
            "achieved_rps": total / sent_for if sent_for else 0.0, "errors": errors,
            "error_count": sum(errors.values()),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "p999_ms": float(np.percentile(ms, 99.9)), "max_ms": float(ms.max()),
            "per_second_min": min(full) if full else 0, "per_second_max": max(full) if full else 0,
            "generator_lag_p99_ms": float(np.percentile(lags, 99)) * 1e3 if lags else 0.0,
            "generator_lag_max_ms": max(lags, default=0.0) * 1e3,
            "generator_cpu_share": round(100.0 * own_cpu / sent_for, 1) if sent_for else 0.0,
            "core_busy_percent": busy_shares(cores_before, cores_after, cores_after.keys()),
            "server_cpu_ms_per_request_by_process": cpu_ms, "samples": samples}


def memory_verdict(samples: list[dict], label: str, warmup: float) -> dict:
    import numpy as np

    series = [(s["t"], s[label]) for s in samples]
    after = next((r for t, r in series if t >= warmup), series[0][1])
    end = series[-1][1]
    tolerance = max(FLAT_SHARE * after, FLAT_BYTES)
    steady = [(t, r) for t, r in series if t >= warmup] or series
    slope = 0.0
    if len(steady) >= 3:
        t, r = np.asarray(steady, dtype=float).T
        slope = float(np.polyfit(t, r, 1)[0]) * 60 / (1 << 20)
    mb = 1 << 20
    return {"start_mb": series[0][1] / mb, "after_warmup_mb": after / mb, "end_mb": end / mb,
            "max_mb": max(r for _, r in series) / mb, "slope_mb_per_min": slope,
            "delta_mb": (end - after) / mb, "tolerance_mb": tolerance / mb, "flat": abs(end - after) <= tolerance}


def new_loop():
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


# ---- report -----------------------------------------------------------------------------------

# ---- main -------------------------------------------------------------------------------------

def pinning() -> tuple[set | None, set | None, str]:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, f"1 CPU ({cpus}): no pinning possible, servers and load share it"
    server, load = {cpus[0]}, set(cpus[1:2]) if len(cpus) < 4 else set(cpus[1:3])
    note = (f"servers on core {cpu_list(server)} (taskset -c {cpu_list(server)}), wrk and the soak generator on "
            f"core(s) {cpu_list(load)}; a chain's transformer and predictor share core {cpu_list(server)}")
    return server, load, note


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per measurement (whole seconds: wrk's unit)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds per measurement, --duration split between them; best round counts")
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrent connections")
    parser.add_argument("--soak", type=float, default=60.0,
                        help="soak seconds at 80%% of the one-process server's peak; 0 skips")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of discarded load before each config")
    parser.add_argument("--stock-rest-protocol", default="v1", choices=["v1", "v2"],
                        help="the stock chain's REST hop (KServe's default is v1)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 s per measurement (1 s rounds), 1 s warm-ups, 8 s soak")
    parser.add_argument("--output", default=str(RESULTS / "serving.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.soak = min(args.duration, 2.0), 1.0, min(args.soak, 8.0)
    args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    args.rounds = max(1, args.rounds)
    args.round_seconds = max(1 if args.quick else 2, round(args.duration / args.rounds))
    return args


LABELS = {"stock_p": "stock KServe predictor", "stock_rest": "stock chain REST ({rest})",
          "stock_grpc": "stock chain grpc-v2", "ours_p": "our predictor", "ours_c": "our chain (grpc-v2)",
          "ours_s": "our one process"}


def start_servers(model_dir: Path, log_dir: Path, cpus, rest: str, servers: list) -> dict:
    """Every configuration's servers, started and ready (appended to `servers` for the caller's
    clean-up), by LABELS key; a chain's as (transformer, predictor)."""
    stock_script = str(ROOT / "benchmarks" / "stock_kserve.py")
    model = ["--model_dir", str(model_dir)]

    def start(*new: Server) -> list[Server]:
        for s in new:
            command = s.pinned_command()
            print(f"  start {s.label}: {' '.join(command[:command.index('--model_dir')])} ...", flush=True)
            servers.append(s.start())
        for s in new:
            s.wait()
        return list(new)

    print("\n[servers]")
    stock_p, ours_p, ours_s = start(
        Server("stock predictor", [stock_script, "predictor", *model], log_dir, cpus),
        Server("our predictor", ["-m", "serving.predictor", *model], log_dir, cpus),
        Server("our one process", ["-m", "serving.single", *model], log_dir, cpus))
    stock_rest_t, stock_grpc_t, ours_t = start(*(
        Server(f"stock transformer {protocol}", [stock_script, "transformer", *model, "--predictor_host", host,
                                                 "--predictor_protocol", protocol], log_dir, cpus)
        for protocol, host in ((rest, f"127.0.0.1:{stock_p.http_port}"), ("grpc-v2", stock_p.grpc))),
        Server("our transformer", ["-m", "serving.transformer", *model, "--predictor_host", ours_p.grpc,
                                   "--predictor_protocol", "grpc-v2"], log_dir, cpus))
    return {"stock_p": (stock_p,), "ours_p": (ours_p,), "ours_s": (ours_s,), "stock_rest": (stock_rest_t, stock_p),
            "stock_grpc": (stock_grpc_t, stock_p), "ours_c": (ours_t, ours_p)}


def soak_run(args, peak: float, url: str, body: bytes, servers: list, has_rate: bool) -> tuple:
    """(soak, memory, generator) of an open-loop soak at SOAK_SHARE x `peak` on `servers`."""
    generator = ("open-loop asyncio+aiohttp generator at a fixed rate, latency from the scheduled send "
                 "time (" + ("this wrk has -R, but the generator reports errors by kind)" if has_rate else
                             "wrk 4 has no fixed-rate mode: -R is wrk2's)"))
    print(f"\n[soak] {args.soak:g} s at {SOAK_SHARE * peak:.0f} req/s; {generator}", flush=True)
    warmup = min(WARMUP_SOAK_SECONDS, args.soak / 6)
    with asyncio.Runner(loop_factory=new_loop) as runner:
        soak = runner.run(open_loop(url, body, SOAK_SHARE * peak, args.soak, servers))
    memory = {s.label: memory_verdict(soak["samples"], s.label, warmup) for s in servers}
    soak["warmup_seconds"] = warmup
    return soak, memory, generator


def report(args, raw: dict, codec: dict, rows: list[dict], soaked: tuple | None, labels: dict, cpus) -> tuple:
    """Print the table, ratios, soak and verdicts; (verdicts, ratios)."""
    server_cpus, load_cpus = cpus
    print_table(raw, codec, rows, server_cpus, load_cpus)
    lines, ratios = ratio_lines(rows, args.clients, raw, labels)
    print("\nratios")
    print("\n".join(lines))
    results = verdicts(rows, args.clients, labels)
    if soaked is not None:
        soak, memory, generator = soaked
        results.append({"target": "soak errors", "value": soak["error_count"], "want": "== 0",
                        "pass": soak["error_count"] == 0, "gap": str(soak["errors"] or "none")})
        for label, m in memory.items():
            results.append({"target": f"soak memory flat: {label}", "value": round(m["delta_mb"], 1),
                            "want": f"|end - after warm-up| <= {m['tolerance_mb']:.0f} MB",
                            "pass": m["flat"], "gap": f"slope {m['slope_mb_per_min']:+.2f} MB/min"})
        print_soak(soak, memory, generator, labels["ours_s"])
    print("\ntargets" + (" (QUICK run: indicative only)" if args.quick else ""))
    for v in results:
        print(f"  {'PASS' if v['pass'] else 'FAIL'}  {v['target']:<60} {v['value']!s:>8}  (want {v['want']}; "
              f"{v['gap']})")
    return results, ratios


def prologue(args) -> tuple:
    """Check wrk, print what runs where; (wrk version, has -R, kserve version, server cpus, load cpus, note)."""
    if not shutil.which("wrk"):
        print("benchmarks/serving.py needs wrk, the HTTP load generator: apt-get install -y wrk", file=sys.stderr)
        return None
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0].strip()
    usage = subprocess.run(["wrk", "--help"], capture_output=True, text=True)
    from importlib.metadata import version

    kserve_version = version("kserve")
    server_cpus, load_cpus, pin_note = pinning()
    print(f"serving benchmark: {wrk_version}; kserve {kserve_version}; python {sys.version.split()[0]}")
    print(f"cores: {os.cpu_count()} (this process may use {sorted(os.sched_getaffinity(0))}); pinning: {pin_note}")
    print(f"load average at start: {loadavg()} (other agents may share these cores)")
    print(f"per measurement: best of {args.rounds} interleaved round(s) of {args.round_seconds} s (--duration "
          f"{args.duration:g}), after a {args.warmup:g} s warm-up; clients {args.clients}; one row per request; v1 "
          f"JSON in{' (QUICK: smoke figures, not for verdicts)' if args.quick else ''}", flush=True)
    return wrk_version, "--rate" in usage.stdout + usage.stderr, kserve_version, server_cpus, load_cpus, pin_note


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    before = prologue(args)
    if before is None:
        return 2
    wrk_version, has_rate, kserve_version, server_cpus, load_cpus, pin_note = before
    started = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    log_dir = RESULTS / "serving-logs"
    log_dir.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    servers: list[Server] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers below on a kill too
    try:
        t = time.perf_counter()
        model_dir, frame = train_model(tmp)
        chain_body, predictor_body, features = bodies(model_dir, frame)
        print(f"model trained in {time.perf_counter() - t:.1f} s; chain body {len(chain_body)} B, predictor body "
              f"{len(predictor_body)} B", flush=True)
        raw = raw_forward(model_dir, features, min(args.duration, 5.0), server_cpus)
        print(f"  raw model forward: {raw['calls_per_s']:.0f} calls/s (p50 {raw['p50_us']:.0f} us, p99 "
              f"{raw['p99_us']:.0f} us)", flush=True)
        codec = raw_codec(model_dir, chain_body, min(args.duration, 3.0), server_cpus)
        print(f"  raw transformer work (parse + FeatureCodec.from_v1 + to_v1 + dump, in-process): "
              f"{codec['us_per_row']:.0f} us per row (from_v1 {codec['from_v1_us']:.0f} us)", flush=True)
        if load_cpus:
            os.sched_setaffinity(0, load_cpus)  # this process drives the soak: keep it off the server core
        labels = {k: v.format(rest=args.stock_rest_protocol) for k, v in LABELS.items()}
        started_by = start_servers(model_dir, log_dir, server_cpus, args.stock_rest_protocol, servers)
        predict = f"/v1/models/{NAME}:predict"
        targets = [(labels[k], started_by[k][0].url + predict, predictor_body if k in ("stock_p", "ours_p")
                    else chain_body, list(started_by[k]))
                   for k in ("stock_p", "ours_p", "ours_s", "stock_rest", "stock_grpc", "ours_c")]
        for label, url, body, _ in targets:
            check_answer(url, body, raw["probability"], label)
        print(f"  every configuration answers probability {raw['probability']:.6f} for the row (the raw forward "
              f"pass's)\n  idle servers wait on the same core while another configuration is measured\n\n[measure]",
              flush=True)
        rows = measure(targets, Wrk(tmp, load_cpus), args.clients, args.round_seconds, args.warmup, args.rounds)
        for key in ("stock_rest", "stock_grpc", "stock_p", "ours_c", "ours_p"):
            for stopped in started_by[key]:
                stopped.stop()
        soaked = None
        if args.soak > 0:  # the default topology (single) under an open-loop load
            peak = max(r["rps"] for r in rows if r["config"] == labels["ours_s"])
            soaked = soak_run(args, peak, started_by["ours_s"][0].url + predict, chain_body,
                              list(started_by["ours_s"]), has_rate)
        started_by["ours_s"][0].stop()
        load_end = loadavg()
        results, ratios = report(args, raw, codec, rows, soaked, labels, (server_cpus, load_cpus))
        print(f"\nload average: start {rows[0]['loadavg_before'] if rows else '-'}, end {load_end}; "
              f"{pin_note}; total {time.time() - started:.0f} s")
        soak = soaked and {**soaked[0], "generator": soaked[2], "memory": soaked[1]}
        output = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "quick": args.quick, "wrk": wrk_version,
                  "kserve": kserve_version, "cores": os.cpu_count(), "pinning": pin_note,
                  "server_cpus": sorted(server_cpus or []), "load_cpus": sorted(load_cpus or []),
                  "duration": args.duration, "rounds": args.rounds, "round_seconds": args.round_seconds,
                  "warmup": args.warmup, "clients": args.clients, "stock_rest_protocol": args.stock_rest_protocol,
                  "loadavg_end": load_end, "raw_forward": raw, "raw_codec": codec, "measurements": rows,
                  "ratios": {k: ({str(n): v for n, v in r.items()} if isinstance(r, dict) else r)
                             for k, r in ratios.items()},
                  "targets": results, "soak": soak}
        Path(args.output).write_text(json.dumps(output, indent=2))
        print(f"results: {args.output}; server logs: {log_dir}")
        return 0  # a completed run; the verdicts are in the output and the JSON
    finally:
        for s in reversed(servers):
            s.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
