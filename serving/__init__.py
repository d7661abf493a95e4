"""KServe predictor and transformer, local launcher and deployers."""
