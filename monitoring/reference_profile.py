"""The reference profile that drift checks compare live traffic with.

It is built at training time, so it lives in the model layer (`model.profile`: training may not
import monitoring, a higher layer); this module is monitoring's name for it, plus reading it back
from a model directory or its metadata."""
from __future__ import annotations

from model.artifact import PROFILE_KEY, read_metadata, reference_profile
from model.profile import FORMAT, bin_counts, build_profile, category_counts, numeric_values, quantile_edges

__all__ = ["FORMAT", "PROFILE_KEY", "bin_counts", "build_profile", "category_counts", "load_profile",
           "numeric_values", "quantile_edges", "reference_profile"]


def load_profile(model_dir: str) -> dict:
    """The profile saved with the model in `model_dir`; a model trained before profiles were saved
    has none, and monitoring cannot check it: say so."""
    profile = reference_profile(read_metadata(model_dir))
    if profile is None:
        raise ValueError(f"the model in {model_dir} has no {PROFILE_KEY!r} in its metadata (trained before "
                         "monitoring profiles were saved): retrain it to monitor it")
    return profile
