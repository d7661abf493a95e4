"""Layer 2: one gateway per external system (the KFP API, MLflow, the Kubernetes API with KServe,
Training Operator and Trainer objects): the only code that calls them."""
