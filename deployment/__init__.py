"""Layer 3, above the serving runtime: how the model is deployed (InferenceService rendering and
rollout, the local deployer, the smoke test)."""
