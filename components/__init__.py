"""Layer 4, KFP components: one module per lifecycle stage, each op a thin wrapper that converts
artifacts and dicts at the boundary and calls one plain stage function."""


def ops() -> dict:
    """Every op by component name, as `flywheel compile` writes them for other teams' pipelines."""
    from components.deploy import deploy_op
    from components.evaluate import evaluate_op, gate_op, register_op
    from components.ingest import ingest_op, split_op
    from components.monitor import champion_op, decide_op, drift_op, trigger_op, window_op
    from components.score import batch_drift_op, collect_op, resolve_op, score_op, screen_op
    from components.train import train_op
    from components.tune import promote_op, propose_op, select_op, trial_op
    from components.validate import validate_op

    functions = (ingest_op, validate_op, split_op, propose_op, trial_op, promote_op, select_op, train_op,
                 evaluate_op, gate_op, register_op, deploy_op,
                 champion_op, window_op, drift_op, decide_op, trigger_op,
                 resolve_op, screen_op, score_op, collect_op, batch_drift_op)
    return {fn.__name__.removesuffix("_op"): fn for fn in functions}
