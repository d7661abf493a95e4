"""Monitoring: payload sink, drift and data-quality checks, retraining triggers (layer 3)."""
