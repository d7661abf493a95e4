"""Training speed, side by side: our training loop vs a bare torch loop, and 1 vs N DDP processes.

    .venv/bin/python benchmarks/training.py [--rows 50000] [--epochs 4] [--batch-size 256]
                                            [--repeats 3] [--workers 2] [--skip-ddp]

1. Framework overhead, one process: `training.train.train` on the reference task against a bare
   hand-written loop (randperm, index a batch, forward, BCE, zero_grad, backward, AdamW step) on
   the same model (model.network.TabularNet), the same preprocessed tensors (same split, same
   fitted Preprocessor), batch size, epochs and threads. Both are timed over their epochs'
   training loops only (ours reports per-epoch loop time in its metadata; its validation pass and
   checkpoint per epoch are outside that window and shown separately as end-to-end figures).
   Runs alternate (ours, bare, ours, bare, ...) and the best of --repeats is reported: on shared
   cores a neighbour's burst only ever slows a run down, so the best run is the loop's own speed.
2. Scaling: the entry point under torchrun with 1 process and with --workers processes (gloo on
   CPU, every process gets cores/processes threads), whole job and training-loop throughput.
3. With a GPU (torch.cuda.is_available()): the same two comparisons on cuda (bf16 autocast),
   and 1 vs all GPUs over nccl when there are several.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.labels import LabelMapping  # noqa: E402
from model.network import TabularNet  # noqa: E402
from model.preprocessing import Preprocessor  # noqa: E402
from pipelines.arguments import train_spec  # noqa: E402
from pipelines.config import load_settings  # noqa: E402
from stages.dataset import ReferenceTask  # noqa: E402
from storage.tables import write_table  # noqa: E402
from training import train as entry  # noqa: E402
from training.backends.jobs import entry_args, entry_spec  # noqa: E402
from training.backends.torchrun import torchrun_command  # noqa: E402
from training.pods import TORCHRUN_ENV  # noqa: E402


def make_spec(epochs: int, batch_size: int) -> dict:
    # patience = epochs: every run trains all epochs, so the runs compare like with like
    settings = load_settings("local", overrides={"training": {"hyperparameters": {
        "epochs": epochs, "batch_size": batch_size, "patience": epochs}}})
    return entry_spec(train_spec(settings), settings.dataset, None)


def loop_throughput(history: list[dict], rows_per_epoch: int) -> float:
    """Samples/s over all epochs' training loops, from the per-epoch figures in the metadata."""
    seconds = sum(rows_per_epoch / h["samples_per_s"] for h in history)
    return rows_per_epoch * len(history) / seconds


def ours(data: Path, spec: dict, device: str) -> dict:
    """The real entry point, in this process (one process: no DDP, as under torchrun with 1 worker)."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        metadata = entry.train(str(data), tmp, spec)
        wall = time.perf_counter() - started
    rows = metadata["train_rows"]
    return {"loop": loop_throughput(metadata["history"], rows), "wall": rows * len(metadata["history"]) / wall}


def prepared_tensors(data: Path, spec: dict, device: torch.device):
    """Exactly what the entry point trains on: its split, its fitted Preprocessor, on the device."""
    hp, dataset = spec["hyperparameters"], spec["dataset"]
    frame = entry.read_training_frame(Path(data).read_bytes())
    target = dataset["target"]
    mapping = (LabelMapping.from_dict(dataset["labels"]) if dataset.get("labels")
               else LabelMapping.infer(frame[target], column=target))
    labels = mapping.encode(frame[target], target)
    train_idx, _ = entry.stratified_split(labels, hp["validation_fraction"], hp["seed"])
    pre = Preprocessor.fit(frame.iloc[train_idx], dataset["features"]["numeric"], dataset["features"]["categorical"])
    num, cat = pre.transform(frame.iloc[train_idx])
    y = labels[train_idx].astype(np.float32)
    tensors = [torch.from_numpy(a).to(device) for a in (num, cat, y)]
    return tensors, pre


def bare(tensors, pre: Preprocessor, spec: dict, device: torch.device) -> dict:
    """The loop anyone would write by hand."""
    hp = spec["hyperparameters"]
    num, cat, y = tensors
    torch.manual_seed(hp["seed"])
    model = TabularNet(pre.numeric_width, pre.cardinalities, hp["embedding_dim"], hp["hidden"], hp["depth"],
                       hp["dropout"]).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    loss_fn = torch.nn.BCEWithLogitsLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n, bs, seconds = len(y), hp["batch_size"], 0.0
    for _ in range(hp["epochs"]):
        model.train()
        sync(device)
        started = time.perf_counter()
        perm = torch.randperm(n, device=device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            with autocast:
                logits = model(num[idx], cat[idx])
            loss = loss_fn(logits.float(), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        seconds += time.perf_counter() - started
    return {"loop": n * hp["epochs"] / seconds}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torchrun_job(data: Path, spec: dict, workers: int, threads: int) -> dict:
    """The entry point under torchrun, as the local launcher runs it; returns job and loop figures."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, **TORCHRUN_ENV, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
        started = time.perf_counter()
        result = subprocess.run(torchrun_command(workers, 0, entry_args(str(data), tmp, spec)), env=env,
                                capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"torchrun with {workers} workers failed:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        metadata = json.loads((Path(tmp) / "metadata.json").read_text())
    rows = metadata["train_rows"]
    return {"loop": loop_throughput(metadata["history"], rows), "job_wall": wall,
            "device": metadata["device"], "backend": metadata["backend"]}


def overhead_rows(data: Path, spec: dict, device: torch.device, repeats: int) -> list[list[str]]:
    threads = torch.get_num_threads()
    tensors, pre = prepared_tensors(data, spec, device)
    runs = {"ours": [], "bare": []}
    ours(data, spec, device.type), bare(tensors, pre, spec, device)  # warm-up: imports, allocator, kernels
    for _ in range(repeats):
        runs["ours"].append(ours(data, spec, device.type))
        runs["bare"].append(bare(tensors, pre, spec, device))
    ours_loop = max(r["loop"] for r in runs["ours"])
    ours_wall = max(r["wall"] for r in runs["ours"])
    bare_loop = max(r["loop"] for r in runs["bare"])
    where = f"{device.type}, 1 process, {threads} thread{'s' if threads > 1 else ''}"
    return [
        [where, "bare torch loop", f"{bare_loop:,.0f}", "1.00"],
        [where, "training.train loop", f"{ours_loop:,.0f}", f"{ours_loop / bare_loop:.2f}"],
        [where, "training.train end to end*", f"{ours_wall:,.0f}", f"{ours_wall / bare_loop:.2f}"],
    ]


def scaling_rows(data: Path, spec: dict, workers: int, cores: int, gpus: int) -> list[list[str]]:
    rows = []
    one = torchrun_job(data, spec, 1, cores if not gpus else 1)
    label = f"{one['device']}"
    rows.append([f"{label}, torchrun 1 process", one["backend"], f"{one['loop']:,.0f}", f"{one['job_wall']:.1f}", "-"])
    many = torchrun_job(data, spec, workers, max(1, cores // workers) if not gpus else 1)
    efficiency = many["loop"] / (workers * one["loop"])
    rows.append([f"{label}, torchrun {workers} processes", many["backend"], f"{many['loop']:,.0f}",
                 f"{many['job_wall']:.1f}", f"{many['loop'] / one['loop']:.2f}x ({efficiency:.0%})"])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=50_000, help="reference-task rows (90%% train)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256, help="the global batch, as in config")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of ours and bare (best of)")
    parser.add_argument("--workers", type=int, default=2, help="DDP processes on CPU")
    parser.add_argument("--skip-ddp", action="store_true", help="only the framework-overhead comparison")
    args = parser.parse_args()

    cores = len(os.sched_getaffinity(0))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    spec = make_spec(args.epochs, args.batch_size)
    print(f"torch {torch.__version__}, {cores} CPU cores, {gpus} GPU(s)"
          f"{' (' + torch.cuda.get_device_name(0) + ')' if gpus else ''}; reference task {args.rows:,} rows "
          f"({int(args.rows * 0.9):,} train), {args.epochs} epochs, batch {args.batch_size}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_table(ReferenceTask(rows=args.rows, seed=7).generate(), Path(tmp) / "train.parquet")
        overhead = overhead_rows(data, spec, torch.device("cpu"), args.repeats) if not gpus else []
        if gpus:
            overhead += overhead_rows(data, spec, torch.device("cuda", 0), args.repeats)
        print(f"\nFramework overhead (training samples/s, best of {args.repeats} alternating runs; ratio vs bare)")
        print(table(["where", "loop", "samples/s", "ratio"], overhead))
        print("* end to end: the whole train() call (read, preprocess, validation pass and checkpoint "
              "every epoch, model write) against the bare loop's training time alone")
        if not args.skip_ddp:
            scaling = []
            if not gpus:
                scaling += scaling_rows(data, spec, args.workers, cores, 0)
            elif gpus > 1:
                scaling += scaling_rows(data, spec, gpus, cores, gpus)
            if scaling:
                print("\nScaling (training-loop samples/s over all processes; job wall includes torchrun start-up)")
                print(table(["where", "backend", "samples/s", "job wall s", "speed-up (efficiency)"], scaling))
            if gpus == 1:
                one = torchrun_job(data, spec, 1, 1)
                print(f"\nGPU under torchrun, 1 process: backend={one['backend']} device={one['device']} "
                      f"loop {one['loop']:,.0f} samples/s, job {one['job_wall']:.1f} s (one GPU: no scaling row)")


if __name__ == "__main__":
    main()
