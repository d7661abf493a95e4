"""Layer 3, serving: KServe predictor and transformer, the local deployer, the InferenceService deployer."""
