"""The training entry point, the same under `torchrun` locally and in PyTorchJob pods.

    python -m training.train --data URI --model-dir URI --spec JSON

DistributedDataParallel over nccl on GPUs and gloo on CPU (chosen automatically),
DistributedSampler sharding, bf16 autocast on GPU, early stopping on a validation split,
deterministic seeds, and checkpoints that a restarted worker group resumes from. `train` runs
four steps: `prepare` (data, split, model), `resume` (a checkpoint of this run, if any), the epochs
(`EpochLoop`) and `finish` (the best epoch's model and its metadata). The processes, their ranks and
each rank's seed and data order per epoch are training/distributed.py's; reading and splitting the
table, training/data.py's.

Resuming is exact: a run killed after epoch k and restarted produces the same model as one that
was never interrupted (bit for bit on CPU with the same world size), because everything an
epoch depends on is either in the checkpoint or derived from (seed, epoch, rank):

- model and optimizer state, and the early-stopping state (best loss and weights, epochs
  without gain, history, whether it already stopped) are in the checkpoint;
- the data order is DistributedSampler's for that epoch (`set_epoch`), so the sequence of
  epochs continues where it stopped instead of replaying epoch 0's order;
- the RNG (dropout) is reseeded at every epoch from (seed, epoch, rank), so the random stream an
  epoch sees is restored from the epoch number alone, also when the world size changes;
- the checkpoint is written by rank 0 only, atomically (temp file + rename locally, a single
  PUT on object stores), and every rank waits at a barrier before going on;
- it carries a fingerprint of the data and the spec: a checkpoint left by another run in the
  same model directory is ignored, never resumed from.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

import storage
from model.artifact import PROFILE_KEY
from model.labels import LabelMapping
from model.loader import save_model
from model.network import TabularNet
from model.preprocessing import Preprocessor
from model.profile import build_profile
from training.checkpoint import CHECKPOINT, CHECKPOINT_FORMAT, fingerprint, load_checkpoint, save_checkpoint
from training.data import read_bytes, read_training_frame, stratified_split
from training.distributed import Context, epoch_order, epoch_seed, setup_distributed

log = logging.getLogger("flywheel.train")


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half), in numpy: importing sklearn in
    every worker would cost more than a second of start-up per restart."""
    positive = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    _, first, counts = np.unique(scores[order], return_index=True, return_counts=True)
    ranks = np.empty(len(scores))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)  # 1-based, ties get their mean rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def train(data_uri: str, model_dir: str, spec: dict) -> dict:
    """Train on `data_uri`, write the model artifact to `model_dir`; returns the metadata."""
    ctx = setup_distributed(expect_gpu=bool(spec.get("expect_gpu", False)))
    try:
        run = prepare(ctx, data_uri, spec)
        checkpoint_uri = spec.get("checkpoint_uri") or storage.join(model_dir, CHECKPOINT)
        state, resumed_from = resume(ctx, run, checkpoint_uri)
        loop = EpochLoop(ctx, run, checkpoint_uri, spec.get("checkpoint_every_epochs", 1))
        for epoch in range(state["epoch"], run.hp["epochs"]):
            if state["stopped"] or loop.run_epoch(epoch, state):
                break
        return finish(ctx, run, state, resumed_from, model_dir, spec)
    finally:
        if ctx.backend:
            dist.destroy_process_group()


@dataclass
class Prepared:
    """Everything the epochs read: the data on the device, its split, the model and its optimizer."""

    spec: dict
    run_id: str  # the checkpoint fingerprint (data bytes, schema, hyperparameters)
    frame: object  # the training table (pandas), kept for the reference profile
    mapping: LabelMapping
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    preprocessor: Preprocessor
    num: torch.Tensor
    cat: torch.Tensor
    y: torch.Tensor
    architecture: dict
    model: TabularNet
    optimizer: torch.optim.Optimizer

    @property
    def hp(self) -> dict:
        return self.spec["hyperparameters"]


def prepare(ctx: Context, data_uri: str, spec: dict) -> Prepared:
    """Seed, read and split the data, fit the preprocessing, and build the model on the device."""
    dataset, hp = spec["dataset"], spec["hyperparameters"]
    numeric, categorical = dataset["features"]["numeric"], dataset["features"].get("categorical", [])
    target = dataset["target"]
    torch.manual_seed(hp["seed"])
    np.random.seed(hp["seed"] & 0xFFFFFFFF)
    if ctx.is_main:
        log.info("start: world_size=%d backend=%s device=%s restart=%d", ctx.world_size,
                 ctx.backend or "single-process", ctx.device, ctx.restart)

    raw = read_bytes(data_uri)
    frame = read_training_frame(raw)
    if target not in frame.columns:
        raise ValueError(f"target column {target!r} is not in {data_uri}")
    # The mapping split saved (config's positive_label applied); inferred here for a bare table.
    mapping = (LabelMapping.from_dict(dataset["labels"]) if dataset.get("labels")
               else LabelMapping.infer(frame[target], column=target))
    labels = mapping.encode(frame[target], target)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"target {target!r} must hold both classes {mapping.classes}, found only {np.unique(labels)}")
    train_idx, val_idx = stratified_split(labels, hp["validation_fraction"], hp["seed"])
    preprocessor = Preprocessor.fit(frame.iloc[train_idx], numeric, categorical)
    # Tabular data is small next to device memory: move it once, then batches are slices on the device.
    num, cat = (torch.from_numpy(a).to(ctx.device) for a in preprocessor.transform(frame))
    y = torch.from_numpy(labels.astype(np.float32)).to(ctx.device)

    architecture = dict(
        numeric_width=preprocessor.numeric_width, cardinalities=preprocessor.cardinalities,
        embedding_dim=hp["embedding_dim"], hidden=hp["hidden"], depth=hp["depth"], dropout=hp["dropout"],
    )
    model = TabularNet(**architecture).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    return Prepared(spec, fingerprint(raw, spec), frame, mapping, labels, train_idx, val_idx,
                    preprocessor, num, cat, y, architecture, model, optimizer)


def resume(ctx: Context, run: Prepared, checkpoint_uri: str) -> tuple[dict, int | None]:
    """The early-stopping state to start from, and the epoch it was saved after (None: a fresh start).
    A checkpoint of this run restores the model and optimizer in place; another run's is ignored."""
    state = {"epoch": 0, "best_loss": float("inf"), "best_state": None, "bad_epochs": 0, "stopped": False,
             "history": []}
    saved = load_checkpoint(checkpoint_uri, ctx.device)
    if saved is not None and saved.get("fingerprint") != run.run_id:
        if ctx.is_main:
            log.warning("ignoring the checkpoint at %s: it belongs to another run (other data or spec)",
                        checkpoint_uri)
        saved = None
    if saved is None:
        return state, None
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    state = saved["state"]
    if ctx.is_main:
        log.info("resumed from checkpoint after epoch %d (%s)%s", state["epoch"], checkpoint_uri,
                 f"; world size {saved['world_size']} -> {ctx.world_size}"
                 if saved["world_size"] != ctx.world_size else "")
    return state, state["epoch"]


class EpochLoop:
    """One epoch at a time: train on this rank's shard, validate, decide on early stopping (rank 0's
    decision holds) and checkpoint. Built after `resume`: DDP broadcasts rank 0's weights on wrapping."""

    def __init__(self, ctx: Context, run: Prepared, checkpoint_uri: str, every: int):
        self.ctx, self.run, self.checkpoint_uri, self.every = ctx, run, checkpoint_uri, every
        hp = run.hp
        self.ddp = (DistributedDataParallel(run.model, device_ids=[ctx.device] if ctx.device.type == "cuda" else None)
                    if ctx.backend else run.model)
        self.sampler = DistributedSampler(run.train_idx, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                          seed=hp["seed"])
        self.train_rows = torch.from_numpy(run.train_idx).to(ctx.device)
        self.batch_size = max(1, hp["batch_size"] // ctx.world_size)  # the global batch stays what config says
        self.loss_fn = torch.nn.BCEWithLogitsLoss()
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.device.type == "cuda")
        self.show_bar = ctx.is_main and sys.stderr.isatty()
        self.val = run.num[run.val_idx], run.cat[run.val_idx], run.y[run.val_idx]  # gathered once

    def run_epoch(self, epoch: int, state: dict) -> bool:
        """Train and validate `epoch`, update `state` and checkpoint when due; True to stop early."""
        ctx, run, hp = self.ctx, self.run, self.run.hp
        train_loss, rows, elapsed = self._train_shard(epoch)
        run.model.eval()
        val_num, val_cat, val_y = self.val
        with torch.inference_mode(), self.autocast:
            val_logits = run.model(val_num, val_cat).float()
        val_loss = float(self.loss_fn(val_logits, val_y))
        val_auc = roc_auc(run.labels[run.val_idx], val_logits.cpu().numpy())
        improved = val_loss < state["best_loss"] - 1e-5
        if improved:
            state["best_loss"], state["bad_epochs"] = val_loss, 0
            state["best_state"] = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        samples_per_s = rows * ctx.world_size / max(elapsed, 1e-9)
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss,
                                 "val_roc_auc": val_auc, "samples_per_s": samples_per_s})
        stop = state["bad_epochs"] >= hp["patience"]
        if ctx.backend:  # every rank computed the same numbers; rank 0's decision is the one that holds
            flag = torch.tensor([int(stop)], device=ctx.device)
            dist.broadcast(flag, 0)
            stop = bool(flag.item())
        state["stopped"] = stop
        if ctx.is_main:
            log.info("epoch %d/%d train_loss=%.4f val_loss=%.4f val_auc=%.4f samples/s=%.0f%s", epoch + 1,
                     hp["epochs"], train_loss, val_loss, val_auc, samples_per_s, "" if improved else " (no gain)")
        if (epoch + 1) % self.every == 0 or stop or epoch + 1 == hp["epochs"]:
            if ctx.is_main:
                save_checkpoint(self.checkpoint_uri, {
                    "format": CHECKPOINT_FORMAT, "fingerprint": run.run_id, "world_size": ctx.world_size,
                    "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "state": state,
                })
            ctx.barrier()
        if stop and ctx.is_main:
            log.info("early stop: no validation gain for %d epochs", hp["patience"])
        return stop

    def _train_shard(self, epoch: int) -> tuple[float, int, float]:
        """One pass over this rank's rows: (mean train loss over all ranks, rows here, seconds)."""
        ctx, run, hp, size = self.ctx, self.run, self.run.hp, self.batch_size
        torch.manual_seed(epoch_seed(hp["seed"], epoch, ctx.rank))
        self.ddp.train()
        ctx.synchronize()
        started = time.perf_counter()
        rows = self.train_rows[epoch_order(self.sampler, epoch).to(ctx.device)]
        e_num, e_cat, e_y = run.num[rows], run.cat[rows], run.y[rows]  # one gather per epoch, then views
        loss_sum = torch.zeros((), device=ctx.device)
        batches = range(0, len(rows), size)
        if self.show_bar:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{hp['epochs']}", leave=False, file=sys.stderr)
        for start in batches:
            xb_num, xb_cat, yb = e_num[start:start + size], e_cat[start:start + size], e_y[start:start + size]
            with self.autocast:
                logits = self.ddp(xb_num, xb_cat)
            loss = self.loss_fn(logits.float(), yb)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            loss_sum.add_(loss.detach(), alpha=len(yb))
        ctx.synchronize()
        elapsed = time.perf_counter() - started
        totals = torch.stack([loss_sum, torch.tensor(float(len(rows)), device=ctx.device)])
        if ctx.backend:
            dist.all_reduce(totals)
        return float(totals[0] / totals[1]), len(rows), elapsed


def finish(ctx: Context, run: Prepared, state: dict, resumed_from: int | None, model_dir: str, spec: dict) -> dict:
    """The best epoch's model with its metadata and reference profile, written by rank 0."""
    dataset, hp = spec["dataset"], run.hp
    numeric, categorical = dataset["features"]["numeric"], dataset["features"].get("categorical", [])
    best = state["history"][int(np.argmin([h["val_loss"] for h in state["history"]]))]
    metadata = {
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "target": dataset["target"],
        "id_column": dataset.get("id_column"),  # the transformer accepts and echoes it (not a feature)
        "labels": run.mapping.to_dict(),
        "features": {"numeric": numeric, "categorical": categorical},
        "hyperparameters": hp,
        "metrics": {"val_loss": best["val_loss"], "val_roc_auc": best["val_roc_auc"], "best_epoch": best["epoch"],
                    "epochs_run": state["epoch"],
                    "samples_per_s": float(np.mean([h["samples_per_s"] for h in state["history"]]))},
        "history": state["history"],
        "world_size": ctx.world_size,
        "backend": ctx.backend or "single-process",
        "device": ctx.device.type,
        "train_rows": len(run.train_idx),
        "validation_rows": len(run.val_idx),
        "resumed_from_epoch": resumed_from,
        **spec.get("lineage", {}),
    }
    if state["best_state"] is None:
        raise ValueError(f"validation loss was never finite ({[h['val_loss'] for h in state['history']]}): "
                         "check the data for infinities and the learning rate")
    if ctx.is_main:
        model = run.model
        model.load_state_dict(state["best_state"])
        # What monitoring compares live traffic with: the training rows' features and the best
        # model's scores on the validation split (the last epoch's logits may be another model's).
        model.eval()
        with torch.inference_mode():
            val_scores = torch.sigmoid(model(run.num[run.val_idx], run.cat[run.val_idx]).float()).cpu().numpy()
        metadata[PROFILE_KEY] = build_profile(run.frame.iloc[run.train_idx], numeric, categorical, val_scores,
                                              run.labels[run.val_idx])
        save_model(model_dir, model.cpu(), run.architecture, run.preprocessor, metadata)
        if not spec.get("keep_checkpoints", False):
            storage.remove(storage.join(model_dir, "checkpoints"))
        log.info("model written to %s", model_dir)
    ctx.barrier()
    return metadata


# No torch.distributed.elastic `@record` here: its error file races with torchrun's agent when a
# sibling worker is killed (the agent read a half-written file, raised JSONDecodeError and died
# instead of restarting the group). The exception's traceback reaches the log on stderr anyway,
# and the torchrun backend takes the failure reason from there.
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, help="training table URI (.parquet or .csv)")
    parser.add_argument("--model-dir", required=True, help="where the model artifact goes (URI)")
    parser.add_argument("--spec", required=True, help="JSON: dataset, hyperparameters, checkpoint options")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(message)s", stream=sys.stdout)
    train(args.data, args.model_dir, json.loads(args.spec))


if __name__ == "__main__":
    main()
    # Done and everything is written (and fsync'd or uploaded): skip the interpreter's teardown of
    # torch, which costs 1-2 s per worker and delays torchrun noticing success. Errors never get
    # here: they propagate out of main() with a traceback and a non-zero exit.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
