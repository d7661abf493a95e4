"""Batch scoring speed and memory: the scoring pipeline's score step (what `score_op` runs per
partition: read the partition's rows from the screened Parquet, serving's preprocessing and
forward pass, label values, lineage columns, write Parquet) against the raw forward pass over the
same rows in memory (`TrainedModel.predict_proba`: preprocessing + network, nothing else).

    .venv/bin/python benchmarks/scoring.py [--rows 1M] [--partition-rows 100k] [--repeat 3]

The rows are ReferenceTask rows; the network has the env's architecture (local config's
hyperparameters) over a preprocessor fitted on them, untrained (speed does not depend on the
weights). Both sides run in this process, one partition after the other (the pipeline runs
`scoring.partitions` of them at once, each in its own task), with the same torch thread count.

Memory: the score step runs again in a fresh process per partition size and prints its peak RSS:
it grows with `partition_rows`, not with the table (a task holds one partition). The screen step
(read + row rules over the whole table) is timed too, for the whole picture.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

TARGET = 0.5  # the score step's rows/s as a share of the raw forward pass's


def parse_size(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1], 1)
    return int(float(text.rstrip("km")) * scale)


def build(rows: int, directory: Path):
    """The table (Parquet, as the screen step writes it), and a model directory for it."""
    import torch

    from model.loader import save_model
    from model.network import TabularNet
    from model.preprocessing import Preprocessor
    from pipelines.config import load_settings
    from stages.dataset import ReferenceTask

    settings = load_settings("local")
    features, hyper = settings.dataset.features, settings.training.hyperparameters
    frame = ReferenceTask(rows=rows, seed=3).generate()
    pre = Preprocessor.fit(frame.head(20_000), features.numeric, features.categorical)
    torch.manual_seed(0)
    architecture = {"numeric_width": pre.numeric_width, "cardinalities": pre.cardinalities, "hidden": hyper.hidden,
                    "depth": hyper.depth}
    save_model(str(directory / "model"), TabularNet(**architecture).eval(), architecture, pre,
               {"labels": {"negative": 0, "positive": 1}, "features": features.model_dump(),
                "id_column": "customer_id"})
    return frame, settings


def score_step(table: str, model_dir: str, partition_rows: int, rows: int, out_dir: str) -> float:
    """What the score tasks do, one partition after the other; seconds."""
    from model.loader import load_model
    from stages.scoring import partitions, read_rows, score_frame

    lineage = {"model_name": "bench", "model_version": "1", "run_id": "bench"}
    started = time.perf_counter()
    for part in partitions(rows, partition_rows):
        frame = read_rows(table, part["start"], part["stop"])
        scored = score_frame(load_model(model_dir), frame, decision_threshold=0.5, lineage=lineage,
                             id_column="customer_id")
        scored.to_parquet(f"{out_dir}/part-{part['partition']}.parquet", index=False)
    return time.perf_counter() - started


def child(args) -> None:
    """The score step alone in a fresh process: its seconds, the RSS its imports and model take
    (baseline) and its peak RSS (MiB), as JSON."""
    import pyarrow.parquet  # noqa: F401  (imports the score step needs, counted in the baseline)

    from model.loader import load_model
    from stages import scoring  # noqa: F401

    load_model(args.model_dir)
    baseline = _status("VmRSS")
    # Restart the high-water mark here (Linux: "5" resets VmHWM), so the imports' peak is not counted.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    with tempfile.TemporaryDirectory() as out:
        seconds = score_step(args.table, args.model_dir, args.partition_rows, args.rows, out)
    peak = _status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "baseline_rss_mib": baseline, "peak_rss_mib": peak}))


def _status(key: str) -> float:
    """A /proc/self/status memory figure in MiB (0 where there is no /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def in_child(table: Path, model_dir: Path, rows: int, partition_rows: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", "--table", str(table), "--model-dir", str(model_dir),
                           "--rows", str(rows), "--partition-rows", str(partition_rows)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--rows", default="1M", type=str)
    cli.add_argument("--partition-rows", default="100k", type=str)
    cli.add_argument("--repeat", default=3, type=int, help="timed runs per side; the best counts")
    cli.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    cli.add_argument("--table", help=argparse.SUPPRESS)
    cli.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = cli.parse_args()
    args.rows, args.partition_rows = parse_size(args.rows), parse_size(args.partition_rows)
    if args.child:
        return child(args)
    report(args.rows, args.partition_rows, args.repeat)


def best(run, repeat: int) -> float:
    """The fastest of `repeat` timed runs (seconds): a shared machine's noise only ever adds time."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def report(rows: int, partition_rows: int, repeat: int) -> None:
    import torch

    from model.loader import load_model
    from stages.scoring import screen
    from stages.validation import load_suite
    from storage.tables import read_table

    print(f"batch scoring, {rows:,} rows, partitions of {partition_rows:,}, torch threads "
          f"{torch.get_num_threads()}, best of {repeat}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        frame, settings = build(rows, tmp)
        frame.to_csv(tmp / "input.csv", index=False)
        model_dir = str(tmp / "model")
        model = load_model(model_dir)
        model.predict_proba(frame.head(1000))  # warm-up
        raw = best(lambda: model.predict_proba(frame), repeat)
        started = time.perf_counter()
        screened = screen(read_table(tmp / "input.csv"), load_suite(settings.dataset, ROOT / "config"),
                          model.preprocessor, "customer_id")
        screen_s = time.perf_counter() - started
        table = tmp / "clean.parquet"
        screened.clean.to_parquet(table, index=False, row_group_size=partition_rows)
        step = best(lambda: score_step(str(table), model_dir, partition_rows, len(screened.clean), str(tmp)), repeat)
        n = len(screened.clean)
        print(f"  raw forward pass (predict_proba, in memory)  {rows / raw:12,.0f} rows/s  ({raw:.2f} s)")
        print(f"  pipeline score step (read, score, write)     {n / step:12,.0f} rows/s  ({step:.2f} s)")
        ratio = (n / step) / (rows / raw)
        print(f"  ratio                                        {ratio:12.2f} x  (target >= {TARGET}x: "
              f"{'met' if ratio >= TARGET else 'NOT met'})")
        print(f"  screen step (row rules, whole table)         {rows / screen_s:12,.0f} rows/s  ({screen_s:.2f} s, "
              f"{len(screened.quarantined):,} quarantined)")
        for size in sorted({max(1, partition_rows // 4), partition_rows, n}):
            m = in_child(table, tmp / "model", n, size)
            print(f"  score step, fresh process, partitions of {size:>9,}: peak RSS {m['peak_rss_mib']:5.0f} MiB "
                  f"(+{m['peak_rss_mib'] - m['baseline_rss_mib']:4.0f} over imports and model)")


if __name__ == "__main__":
    main()
