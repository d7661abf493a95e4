"""Model, DDP training entry point (torchrun / PyTorchJob pods) and the launchers."""
