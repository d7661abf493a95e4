"""Layer 3, serving: what the serving image runs (KServe predictor and transformer, codec, hop,
errors, payload events, metrics). How it is deployed lives in `deployment/`."""
