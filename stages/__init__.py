"""Layer 3, plain stage functions: dataset, validation, metrics, gate, report, evaluation, tuning,
MLflow tracking, the registry and its versions. Each is testable without KFP or a cluster."""
