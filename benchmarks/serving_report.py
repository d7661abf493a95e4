"""What benchmarks/serving.py prints and judges: the table, the ratios between configurations, the
targets' verdicts and the soak. The configurations are named by `labels` (key -> the row's label):
stock_p, stock_rest, stock_grpc (stock KServe), ours_p (our predictor), ours_c (our chain),
ours_s (our one-process server, `serving.topology: single`).
"""
from __future__ import annotations

SOAK_SHARE = 0.8
# Issue 16: the chain against the predictor alone; the one process against the same (moonshot 1.0x).
TARGET_CHAIN_RATIO, TARGET_P99_16_MS, TARGET_P99_4_MS = 0.7, 20.0, 10.0
TARGET_SINGLE_RATIO, MOONSHOT_SINGLE_RATIO = 0.9, 1.0


def at(rows: list[dict], config: str, clients: int) -> dict | None:
    return next((r for r in rows if r["config"] == config and r["clients"] == clients), None)


def print_table(raw: dict, codec: dict, rows: list[dict], server_cores, load_cores) -> None:
    """The figures. req/s and latencies are the best round's, `rounds` the req/s spread over the
    rounds; CPU ms/req is the servers' CPU time per request (transformer + predictor for a chain),
    wrk% the load generator's share of its core, coreN% each core's busy share (anyone's)."""
    cores = sorted(set(server_cores or ()) | set(load_cores or ()))
    columns = [("configuration", "<30"), ("clients", ">7"), ("req/s", ">7"), ("rounds", ">11"), ("p50 ms", ">7"),
               ("p99 ms", ">7"), ("p99.9", ">7"), ("errors", ">6"), ("CPU ms/req", ">10"), ("(T + P)", ">11"),
               ("wrk%", ">5"), *((f"core{c}%", ">6") for c in cores), ("load1", ">5")]

    def line(*values) -> str:
        return " ".join(f"{v:{fmt}}" for v, (_, fmt) in zip(values, columns))

    head = line(*(name for name, _ in columns))
    print("\n" + head)
    print("-" * len(head))
    print(line("raw model forward (in-process)", "-", f"{raw['calls_per_s']:.0f}", "", f"{raw['p50_us'] / 1e3:.3f}",
               f"{raw['p99_us'] / 1e3:.3f}", "-", "-", f"{1e3 / raw['calls_per_s']:.3f}"))
    print(line("raw transformer work (in-proc)", "-", f"{1e6 / codec['us_per_row']:.0f}", "", "", "", "", "-",
               f"{codec['us_per_row'] / 1e3:.3f}"))
    last = None
    for row in rows:
        if last and last != row["config"]:
            print()
        last = row["config"]
        split = list(row["server_cpu_ms_per_request_by_process"].values())
        print(line(row["config"], row["clients"], f"{row['rps']:.0f}", f"{row.get('rps_min', row['rps']):.0f}-"
                   f"{row['rps']:.0f}", f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['p999_ms']:.2f}",
                   row["errors"], f"{row['server_cpu_ms_per_request']:.3f}",
                   f"{split[0]:.2f} + {split[1]:.2f}" if len(split) == 2 else "", f"{row['wrk_cpu_share']:.0f}",
                   *(f"{row['core_busy_percent'].get(c, 0):.0f}" for c in cores), f"{row['loadavg_before'][0]:.2f}"))


def ratio_lines(rows: list[dict], clients: list[int], raw: dict, labels: dict) -> tuple[list[str], dict]:
    lines, ratios = [], {}

    def pair(name: str, top: str, bottom: str, key: str = "rps") -> None:
        values = {}
        for n in clients:
            a, b = at(rows, top, n), at(rows, bottom, n)
            if a and b and b[key]:
                values[n] = a[key] / b[key]
        ratios[name] = values
        lines.append(f"  {name:<52} " + "  ".join(f"{n:>2}c {v:5.2f}x" for n, v in values.items()))

    pair("our predictor / stock predictor (req/s)", labels["ours_p"], labels["stock_p"])
    pair("one process / our predictor alone (req/s)", labels["ours_s"], labels["ours_p"])
    pair("one process / our chain (req/s)", labels["ours_s"], labels["ours_c"])
    pair("our chain / our predictor alone (req/s)", labels["ours_c"], labels["ours_p"])
    pair("our chain / stock chain REST (req/s)", labels["ours_c"], labels["stock_rest"])
    pair("our chain / stock chain grpc-v2 (req/s)", labels["ours_c"], labels["stock_grpc"])
    pair("stock chain REST / stock predictor (req/s)", labels["stock_rest"], labels["stock_p"])
    pair("stock chain grpc-v2 / stock predictor (req/s)", labels["stock_grpc"], labels["stock_p"])
    pair("stock predictor / our predictor (CPU ms per request)", labels["stock_p"], labels["ours_p"],
         "server_cpu_ms_per_request")
    pair("stock chain grpc-v2 / our chain (CPU ms per request)", labels["stock_grpc"], labels["ours_c"],
         "server_cpu_ms_per_request")
    pair("one process / our predictor (CPU ms per request)", labels["ours_s"], labels["ours_p"],
         "server_cpu_ms_per_request")
    one = at(rows, labels["ours_p"], 1)
    if one:
        overhead = 1e6 / one["rps"] - 1e6 / raw["calls_per_s"]
        lines.append(f"  {'raw forward / our predictor at 1 client (req/s)':<52}  1c "
                     f"{raw['calls_per_s'] / one['rps']:5.1f}x  (serving adds ~{overhead:.0f} us per request)")
        ratios["raw forward / our predictor @1"] = raw["calls_per_s"] / one["rps"]
    return lines, ratios


def _ratio_verdict(verdict, rows: list[dict], labels: dict, top: str, bottom: str, want: float, what: str) -> None:
    a, b = at(rows, labels[top], 16), at(rows, labels[bottom], 16)
    if a and b:
        r = a["rps"] / b["rps"]
        verdict(f"{what} throughput / our predictor alone @16 clients", round(r, 3), f">= {want}", r >= want,
                f"{r - want:+.2f}x ({a['rps']:.0f} vs {b['rps']:.0f} req/s; needs {want * b['rps']:.0f})")


def _p99_verdicts(verdict, rows: list[dict], label: str, what: str) -> None:
    for n, limit in ((16, TARGET_P99_16_MS), (4, TARGET_P99_4_MS)):
        row = at(rows, label, n)
        if row:
            verdict(f"{what} p99 @{n} clients (ms)", round(row["p99_ms"], 2), f"<= {limit}", row["p99_ms"] <= limit,
                    f"{row['p99_ms'] - limit:+.2f} ms")


def verdicts(rows: list[dict], clients: list[int], labels: dict) -> list[dict]:
    results = []

    def verdict(name: str, value, target: str, ok, gap: str) -> None:
        results.append({"target": name, "value": value, "want": target, "pass": ok, "gap": gap})

    _ratio_verdict(verdict, rows, labels, "ours_s", "ours_p", TARGET_SINGLE_RATIO, "one process")
    _ratio_verdict(verdict, rows, labels, "ours_s", "ours_p", MOONSHOT_SINGLE_RATIO, "one process (moonshot)")
    _p99_verdicts(verdict, rows, labels["ours_s"], "one process")
    _ratio_verdict(verdict, rows, labels, "ours_c", "ours_p", TARGET_CHAIN_RATIO, "our chain")
    _p99_verdicts(verdict, rows, labels["ours_c"], "our chain")
    for n in clients:
        ours, stock = at(rows, labels["ours_p"], n), at(rows, labels["stock_p"], n)
        if ours and stock:
            r = ours["rps"] / stock["rps"]
            verdict(f"our predictor / stock KServe predictor @{n} clients", round(r, 3), ">= 1.0", r >= 1.0,
                    f"{r - 1:+.2f}x ({ours['rps']:.0f} vs {stock['rps']:.0f} req/s)")
            c = ours["server_cpu_ms_per_request"] / stock["server_cpu_ms_per_request"]
            verdict(f"our predictor / stock predictor CPU per request @{n} clients", round(c, 3), "<= 1.0",
                    c <= 1.0, f"{c - 1:+.1%} ({ours['server_cpu_ms_per_request']:.3f} vs "
                    f"{stock['server_cpu_ms_per_request']:.3f} ms)")
    return results


def print_soak(soak: dict, memory: dict, generator: str, what: str) -> None:
    print(f"\nsoak: {what}, {soak['seconds']:.0f} s at {soak['rate']:.0f} req/s ({SOAK_SHARE:.0%} of its peak), "
          f"{generator}")
    print(f"  sent {soak['sent']}, answered {soak['answered']}, achieved {soak['achieved_rps']:.0f} req/s "
          f"(per-second {soak['per_second_min']}-{soak['per_second_max']})")
    busy = ", ".join(f"core{c} {v:.0f}%" for c, v in soak["core_busy_percent"].items())
    print(f"  generator: {soak['generator_cpu_share']:.0f}% of its core, send lag p99 "
          f"{soak['generator_lag_p99_ms']:.1f} ms, max {soak['generator_lag_max_ms']:.1f} ms; "
          f"cores busy (anyone's) {busy}")
    print(f"  latency from scheduled send: p50 {soak['p50_ms']:.2f} ms  p99 {soak['p99_ms']:.2f} ms  "
          f"p99.9 {soak['p999_ms']:.2f} ms  max {soak['max_ms']:.1f} ms")
    print(f"  errors: {soak['error_count']} {soak['errors'] or ''}".rstrip()
          + (" (open loop: a server that falls behind the rate shows here and in the latency)"
             if soak["error_count"] else ""))
    print("  servers' CPU ms per request: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                       soak["server_cpu_ms_per_request_by_process"].items()))
    for label, m in memory.items():
        print(f"  RSS {label:<16} start {m['start_mb']:6.1f} MB  after warm-up {m['after_warmup_mb']:6.1f}  end "
              f"{m['end_mb']:6.1f}  max {m['max_mb']:6.1f}  slope {m['slope_mb_per_min']:+.2f} MB/min  "
              f"delta {m['delta_mb']:+.1f} MB (tolerance {m['tolerance_mb']:.0f}): "
              f"{'flat' if m['flat'] else 'NOT FLAT'}")
