"""Layer 3, monitoring: reference profile, payload sink service, drift and quality checks, drift
report, guarded retraining trigger."""
