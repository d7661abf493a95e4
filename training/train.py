"""The training entry point, the same under `torchrun` locally and in PyTorchJob pods.

    python -m training.train --data URI --model-dir URI --spec JSON

DistributedDataParallel over nccl on GPUs and gloo on CPU (chosen automatically),
DistributedSampler sharding, bf16 autocast on GPU, early stopping on a validation split,
deterministic seeds, and checkpoints that a restarted worker group resumes from.
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from training import storage
from training.artifact import save_model
from training.model import TabularNet
from training.preprocessing import Preprocessor

log = logging.getLogger("flywheel.train")
CHECKPOINT = "checkpoints/last.pt"


@dataclass
class Context:
    rank: int
    world_size: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.backend:
            dist.barrier()


def setup_distributed() -> Context:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if world_size > 1:
        dist.init_process_group(backend=backend)
        return Context(rank, world_size, device, backend)
    return Context(0, 1, device, None)


def read_training_frame(data_uri: str):
    import pandas as pd

    with storage.open_uri(data_uri) as handle:
        data = handle.read()
    if data[:4] == b"PAR1":  # KFP artifact paths carry no extension: look at the bytes
        return pd.read_parquet(io.BytesIO(data))
    return pd.read_csv(io.BytesIO(data), compression="gzip" if data[:2] == b"\x1f\x8b" else None)


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for value in np.unique(labels):
        index = rng.permutation(np.flatnonzero(labels == value))
        held[index[: max(1, int(round(len(index) * fraction)))]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores)) if len(np.unique(labels)) == 2 else float("nan")


def train(data_uri: str, model_dir: str, spec: dict) -> dict:
    """Train on `data_uri`, write the model artifact to `model_dir`; returns the metadata."""
    ctx = setup_distributed()
    try:
        return _train(ctx, data_uri, model_dir, spec)
    finally:
        if ctx.backend:
            dist.destroy_process_group()


def _train(ctx: Context, data_uri: str, model_dir: str, spec: dict) -> dict:
    dataset, hp = spec["dataset"], spec["hyperparameters"]
    numeric, categorical = dataset["features"]["numeric"], dataset["features"].get("categorical", [])
    target = dataset["target"]
    torch.manual_seed(hp["seed"])
    np.random.seed(hp["seed"])

    frame = read_training_frame(data_uri)
    if target not in frame.columns:
        raise ValueError(f"target column {target!r} is not in {data_uri}")
    labels = frame[target].to_numpy()
    if set(np.unique(labels)) - {0, 1} or len(np.unique(labels)) < 2:
        raise ValueError(f"target {target!r} must hold both classes 0 and 1, found {np.unique(labels)[:10]}")
    train_idx, val_idx = stratified_split(labels, hp["validation_fraction"], hp["seed"])
    preprocessor = Preprocessor.fit(frame.iloc[train_idx], numeric, categorical)
    num, cat = (torch.from_numpy(a) for a in preprocessor.transform(frame))
    y = torch.from_numpy(labels.astype(np.float32))

    architecture = dict(
        numeric_width=preprocessor.numeric_width, cardinalities=preprocessor.cardinalities,
        embedding_dim=hp["embedding_dim"], hidden=hp["hidden"], depth=hp["depth"], dropout=hp["dropout"],
    )
    model = TabularNet(**architecture).to(ctx.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
    state = {"epoch": 0, "best_loss": float("inf"), "best_state": None, "bad_epochs": 0, "history": []}

    checkpoint_uri = spec.get("checkpoint_uri") or storage.join(model_dir, CHECKPOINT)
    if storage.exists(checkpoint_uri):
        with storage.open_uri(checkpoint_uri) as handle:
            saved = torch.load(io.BytesIO(handle.read()), map_location=ctx.device, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        state = saved["state"]
        torch.set_rng_state(saved["rng"])
        if ctx.is_main:
            log.info("resumed from checkpoint after epoch %d (%s)", state["epoch"], checkpoint_uri)

    ddp = DistributedDataParallel(model) if ctx.backend else model
    sampler = DistributedSampler(train_idx, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=hp["seed"])
    batch_size = max(1, hp["batch_size"] // ctx.world_size)  # the global batch stays what config says
    loss_fn = torch.nn.BCEWithLogitsLoss()
    val_num, val_cat, val_y = num[val_idx].to(ctx.device), cat[val_idx].to(ctx.device), y[val_idx]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=ctx.device.type == "cuda")
    show_bar = ctx.is_main and sys.stderr.isatty()

    for epoch in range(state["epoch"], hp["epochs"]):
        sampler.set_epoch(epoch)
        order = torch.as_tensor(train_idx)[torch.as_tensor(list(sampler))]
        ddp.train()
        started, total, seen = time.perf_counter(), torch.zeros(2, device=ctx.device), 0
        batches = range(0, len(order), batch_size)
        if show_bar:
            from tqdm import tqdm

            batches = tqdm(batches, desc=f"epoch {epoch + 1}/{hp['epochs']}", leave=False, file=sys.stderr)
        for start in batches:
            index = order[start : start + batch_size]
            xb_num, xb_cat, yb = num[index].to(ctx.device), cat[index].to(ctx.device), y[index].to(ctx.device)
            with autocast:
                loss = loss_fn(ddp(xb_num, xb_cat).float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += torch.stack([loss.detach() * len(index), torch.tensor(len(index), device=ctx.device)])
            seen += len(index)
        if ctx.backend:
            dist.all_reduce(total)
        elapsed = time.perf_counter() - started

        model.eval()
        with torch.inference_mode(), autocast:
            val_logits = model(val_num, val_cat).float().cpu()
        val_loss = float(loss_fn(val_logits, val_y))
        val_auc = roc_auc(val_y.numpy(), val_logits.numpy())
        improved = val_loss < state["best_loss"] - 1e-5
        if improved:
            state["best_loss"], state["best_state"], state["bad_epochs"] = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            state["bad_epochs"] += 1
        samples_per_s = seen * ctx.world_size / max(elapsed, 1e-9)
        state["epoch"] = epoch + 1
        state["history"].append({"epoch": epoch + 1, "train_loss": float(total[0] / total[1]), "val_loss": val_loss,
                                 "val_roc_auc": val_auc, "samples_per_s": samples_per_s})
        if ctx.is_main:
            log.info("epoch %d/%d train_loss=%.4f val_loss=%.4f val_auc=%.4f samples/s=%.0f%s", epoch + 1,
                     hp["epochs"], total[0] / total[1], val_loss, val_auc, samples_per_s, "" if improved else " (no gain)")
        stop = state["bad_epochs"] >= hp["patience"]
        if (epoch + 1) % spec.get("checkpoint_every_epochs", 1) == 0 or stop or epoch + 1 == hp["epochs"]:
            if ctx.is_main:
                buffer = io.BytesIO()
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state,
                            "rng": torch.get_rng_state()}, buffer)
                storage.write_atomic(checkpoint_uri, buffer.getvalue())
            ctx.barrier()
        if stop:
            if ctx.is_main:
                log.info("early stop: no validation gain for %d epochs", hp["patience"])
            break

    best = state["history"][int(np.argmin([h["val_loss"] for h in state["history"]]))]
    metadata = {
        "framework": "pytorch",
        "torch_version": torch.__version__,
        "target": target,
        "features": {"numeric": numeric, "categorical": categorical},
        "hyperparameters": hp,
        "metrics": {"val_loss": best["val_loss"], "val_roc_auc": best["val_roc_auc"], "best_epoch": best["epoch"],
                    "epochs_run": state["epoch"], "samples_per_s": float(np.mean([h["samples_per_s"] for h in state["history"]]))},
        "history": state["history"],
        "world_size": ctx.world_size,
        "backend": ctx.backend or "single-process",
        "device": ctx.device.type,
        "train_rows": len(train_idx),
        "validation_rows": len(val_idx),
        **spec.get("lineage", {}),
    }
    if ctx.is_main:
        model.load_state_dict(state["best_state"])
        save_model(model_dir, model.cpu(), architecture, preprocessor, metadata)
        if not spec.get("keep_checkpoints", False):
            storage.remove(storage.join(model_dir, "checkpoints"))
    ctx.barrier()
    return metadata


@record  # torchrun's failure summary then carries this process's exception, not just an exit code
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
