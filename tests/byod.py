"""The README's "Bring your own data" example, sized for a test: a churn CSV of another schema (an
id, a yes/no label, two numeric and two categorical columns) and the env file that configures it."""
import numpy as np
import pandas as pd
import yaml

NUMERIC, CATEGORICAL = ["tenure_months", "monthly_spend"], ["plan", "channel"]


def churn_frame(rows: int = 3000, seed: int = 11) -> pd.DataFrame:
    """Subscribers who churn or not: short tenure, high spend and the basic plan churn more."""
    rng = np.random.default_rng(seed)
    tenure = rng.integers(1, 72, rows)
    spend = rng.gamma(4.0, 15.0, rows).round(2)
    plan = rng.choice(["basic", "plus", "pro"], rows, p=[0.5, 0.3, 0.2])
    channel = rng.choice(["web", "store", "phone"], rows, p=[0.6, 0.25, 0.15])
    logit = 0.8 - 0.06 * tenure + 0.02 * (spend - 60) + np.where(plan == "basic", 1.0, 0.0) \
        + np.where(channel == "phone", 0.4, 0.0)
    churned = np.where(rng.random(rows) < 1 / (1 + np.exp(-logit)), "yes", "no")
    return pd.DataFrame({"account_ref": [f"A{i:07d}" for i in range(rows)], "tenure_months": tenure,
                         "monthly_spend": spend, "plan": plan, "channel": channel, "churned": churned})


def byod_env(config_dir, data_uri, tmp_path, **extra) -> str:
    """config/churn.yaml: the README's "Bring your own data" section, sized for a test."""
    env = {
        "namespace": "flywheel-churn", "image": {"tag": "local"}, "kfp": {"host": None},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
        "dataset": {"source": "file", "uri": str(data_uri), "target": "churned", "id_column": "account_ref",
                    "features": {"numeric": NUMERIC, "categorical": CATEGORICAL}},
        "training": {"backend": "torchrun", "workers": 1, "resources": {"cpu": "1", "memory": "2Gi"},
                     "hyperparameters": {"epochs": 3, "patience": 1}},
        "tuning": {"enabled": False},
        "evaluation": {"thresholds": {"roc_auc": 0.6}},
        "serving": {"deployer": "local", "min_replicas": 1, "max_replicas": 1},
    }
    from pipelines.config import deep_merge

    (config_dir / "churn.yaml").write_text(yaml.safe_dump(deep_merge(env, extra)))
    return "churn"
