"""Validation speed, side by side: our stage vs naive great-expectations vs plain pandas.

    .venv/bin/python benchmarks/validation.py [--sizes 10k,100k,1M,5M] [--naive-max 1M]

Every contender validates the same credit_default suite (config/expectations) on the same CSV
(ReferenceTask data, cached under benchmarks/results/), end to end from the file, each in its own
subprocess so that peak memory is its own. Each process first validates a 1k-row file (imports,
context, first-call costs: one-off per task); the timed run reads and validates the whole file.

  ours        stages.validation.validate_file: pyarrow read, one batched BASIC run
  gx-suite    GX with its defaults: pd.read_csv, one batch.validate(suite) (SUMMARY format)
  gx-naive    pd.read_csv, one batch.validate(expectation) per expectation (skipped above --naive-max)
  pandas      the same checks hand-written in pandas on pd.read_csv (no reports, no row samples)
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("ours", "gx-suite", "gx-naive", "pandas")
WARMUP_ROWS = 1000
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def dataset(rows: int) -> Path:
    """The reference task at `rows`, generated once and cached as CSV."""
    path = RESULTS / f"credit_default_{rows}.csv"
    if not path.exists():
        sys.path.insert(0, str(ROOT))
        from stages.dataset import ReferenceTask
        from storage.tables import write_table

        tmp = path.with_suffix(".tmp.csv")
        write_table(ReferenceTask(rows=rows, seed=7).generate(), tmp)
        tmp.rename(path)
    return path


def suite() -> dict:
    sys.path.insert(0, str(ROOT))
    from stages.validation import load_suite

    return load_suite({"expectation_suite": "credit_default", "id_column": "customer_id"}, ROOT / "config")


# ----------------------------------------------------------------------------- contenders


def run_ours(path: Path, s: dict) -> bool:
    from stages.validation import validate_file

    return validate_file(path, s, id_column="customer_id").passed


def _naive_context():
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    asset = context.data_sources.add_pandas("naive").add_dataframe_asset("frame")
    return gx, asset.add_batch_definition_whole_dataframe("all")


def _gx_expectations(s: dict):
    from great_expectations.expectations.registry import get_expectation_impl

    return [get_expectation_impl(e["type"])(**e["kwargs"]) for e in s["expectations"]]


def run_gx_suite(path: Path, s: dict, prepared) -> bool:
    import pandas as pd

    gx, batch_definition = prepared
    suite_ = gx.ExpectationSuite(name="bench")
    for expectation in _gx_expectations(s):
        suite_.add_expectation(expectation)
    batch = batch_definition.get_batch(batch_parameters={"dataframe": pd.read_csv(path)})
    return batch.validate(suite_).success


def run_gx_naive(path: Path, s: dict, prepared) -> bool:
    import pandas as pd

    _, batch_definition = prepared
    batch = batch_definition.get_batch(batch_parameters={"dataframe": pd.read_csv(path)})
    return all([batch.validate(expectation).success for expectation in _gx_expectations(s)])


def run_pandas(path: Path, s: dict) -> bool:
    """The suite's checks written by hand: what a team without GX would maintain."""
    import pandas as pd

    df = pd.read_csv(path)
    ok = True
    for e in s["expectations"]:
        k, t = e["kwargs"], e["type"]
        col = df[k["column"]] if "column" in k and k["column"] in df else None
        if t == "expect_table_columns_to_match_set":
            good = set(df.columns) == set(k["column_set"])
        elif t == "expect_column_to_exist":
            good = k["column"] in df
        elif t == "expect_column_values_to_be_in_type_list":
            good = str(col.dtype) in k["type_list"] or (col.dtype == object and col.dropna().map(type).eq(str).all())
        elif t == "expect_table_row_count_to_be_between":
            good = (k.get("min_value") or 0) <= len(df) <= (k.get("max_value") or float("inf"))
        elif t == "expect_column_values_to_not_be_null":
            good = col.notna().mean() >= k.get("mostly", 1.0)
        elif t == "expect_column_values_to_be_unique":
            good = not col.dropna().duplicated().any()
        elif t == "expect_column_values_to_be_between":
            good = col.dropna().between(k["min_value"], k["max_value"]).all()
        elif t == "expect_column_values_to_be_in_set":
            good = col.dropna().isin(k["value_set"]).all()
        elif t == "expect_column_distinct_values_to_equal_set":
            good = set(col.dropna().unique()) == set(k["value_set"])
        elif t == "expect_column_pair_values_a_to_be_greater_than_b":
            pair = df[[k["column_A"], k["column_B"]]].dropna()
            good = (pair[k["column_A"]] >= pair[k["column_B"]]).all()
        elif t == "expect_column_mean_to_be_between":
            good = k["min_value"] <= col.mean() <= k["max_value"]
        elif t == "expect_column_quantile_values_to_be_between":
            q = col.quantile(k["quantile_ranges"]["quantiles"]).to_list()
            good = all(lo <= v <= hi for v, (lo, hi) in zip(q, k["quantile_ranges"]["value_ranges"]))
        else:
            raise NotImplementedError(t)
        ok &= bool(good) or e["severity"] == "warn"
    return ok


def one(method: str, path: Path) -> dict:
    """Run one contender in this process and report seconds (excluding imports) and peak RSS."""
    s = suite()
    prepared = None
    if method == "ours":
        from stages.validation.engine import gx_engine

        gx_engine()
    elif method.startswith("gx"):
        prepared = _naive_context()
    else:
        import pandas  # noqa: F401
    run = {"ours": lambda p: run_ours(p, s), "gx-suite": lambda p: run_gx_suite(p, s, prepared),
           "gx-naive": lambda p: run_gx_naive(p, s, prepared), "pandas": lambda p: run_pandas(p, s)}[method]
    run(dataset(WARMUP_ROWS))  # first-call costs (lazy imports, metric registry) once, for every contender
    started = time.perf_counter()
    passed = run(path)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "passed": passed,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10k,100k,1M,5M")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--naive-max", default="1M",
                        help="skip gx-naive above this many rows (it is O(expectations x rows))")
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], Path(args.one[1]))))
        return

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    methods = [m for m in args.methods.split(",") if m in METHODS]
    naive_max = parse_size(args.naive_max)
    RESULTS.mkdir(parents=True, exist_ok=True)
    dataset(WARMUP_ROWS)
    print(f"suite credit_default: {len(suite()['expectations'])} expectations; CSV input; {os.cpu_count()} CPUs; "
          "rows/s end to end from the file (after a warm-up), peak RSS per process")
    header = f"{'rows':>10} | " + " | ".join(f"{m:>18}" for m in methods) + " | ours vs gx-naive | ours vs gx-suite"
    print(header + "\n" + "-" * len(header), flush=True)
    records = []
    for rows in sizes:
        path = dataset(rows)
        cells, speed = [], {}
        for method in methods:
            if method == "gx-naive" and rows > naive_max:
                cells.append(f"{'skipped':>18}")
                continue
            out = subprocess.run([sys.executable, __file__, "--one", method, str(path)], capture_output=True,
                                 text=True, cwd=ROOT)
            if out.returncode != 0:
                cells.append(f"{'error':>18}")
                print(out.stderr[-2000:], file=sys.stderr)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            speed[method] = rows / r["seconds"]
            records.append({"rows": rows, "method": method, **r})
            cells.append(f"{speed[method]:>9,.0f} {r['peak_rss_gib']:4.1f}G{'' if r['passed'] else '!':1}".rjust(18))
        # speed bound as a default (B023); ratio is only called within this row anyway
        ratio = lambda other, speed=speed: (f"{speed['ours'] / speed[other]:.1f}x"
                                            if "ours" in speed and other in speed else "-")
        print(f"{rows:>10,} | " + " | ".join(cells) + f" | {ratio('gx-naive'):>16} | {ratio('gx-suite'):>16}",
              flush=True)
    (RESULTS / "validation.json").write_text(json.dumps(records, indent=1))
    print("cells: rows/s and peak RSS; '!' = the data failed validation (it should not: clean reference data)")


if __name__ == "__main__":
    main()
