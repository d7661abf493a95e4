"""Layer 3, training: the DDP entry point (`train.py`, the same under torchrun and in cluster pods),
the pod settings cluster jobs share, and the backends that run it (torchrun, PyTorchJob, TrainJob)."""
