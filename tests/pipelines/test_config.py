"""Environments are data: every env loads, differences live in config, and bad config says where."""
import pytest
import yaml

from pipelines.config import ConfigError, environments, load_all, load_settings


def write(config_dir, name, data):
    (config_dir / f"{name}.yaml").write_text(yaml.safe_dump(data))


def patch(config_dir, name, update):
    data = yaml.safe_load((config_dir / f"{name}.yaml").read_text()) or {}
    from pipelines.config import deep_merge

    write(config_dir, name, deep_merge(data, update))


def test_every_environment_loads_and_differs_where_it_should():
    settings = load_all()
    assert set(settings) == set(environments()) == {"local", "dev", "staging", "prod"}
    assert settings["local"].training.backend == "torchrun"
    assert all(settings[e].training.backend == "pytorchjob" for e in ("dev", "staging", "prod"))
    assert settings["dev"].training.resources.gpu.resource == "nvidia.com/mig-1g.5gb"
    assert settings["prod"].training.resources.gpu.resource == "nvidia.com/gpu"
    assert settings["prod"].training.resources.gpu.product == "NVIDIA-A100-SXM4-80GB"
    assert settings["prod"].image.ref.startswith("ghcr.io/flywheel-ml/flywheel@sha256:")
    assert settings["dev"].image.ref.endswith(":0.1.0-dev")
    assert settings["local"].kfp.host is None and settings["prod"].kfp.host.startswith("https://")
    # base.yaml values survive the deep merge where the env does not override them
    assert settings["prod"].dataset.features == settings["local"].dataset.features


def test_local_sqlite_uri_is_absolute_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = load_settings("local").mlflow.tracking_uri
    assert uri.startswith("sqlite:////") and uri.endswith("/runs/mlflow.db")


def test_unknown_key_names_the_env_file_and_key_path(config_dir):
    patch(config_dir, "dev", {"training": {"resources": {"gpus": 2}}})
    with pytest.raises(ConfigError) as err:
        load_settings("dev", config_dir)
    assert f"{config_dir / 'dev.yaml'}: training.resources.gpus: unknown key" in str(err.value)


def test_wrong_literal_lists_the_allowed_values(config_dir):
    patch(config_dir, "base", {"training": {"backend": "slurm"}})
    patch(config_dir, "local", {"training": {"backend": "slurm"}})
    with pytest.raises(ConfigError) as err:
        load_settings("local", config_dir)
    message = str(err.value)
    assert "local.yaml: training.backend: got 'slurm'; allowed: 'torchrun', 'pytorchjob' or 'trainjob'" in message


def test_error_points_at_base_when_base_set_the_bad_value(config_dir):
    patch(config_dir, "base", {"evaluation": {"thresholds": {"roc_auc": 1.5}}})
    # staging.yaml overrides roc_auc itself, so only envs that inherit it fail
    assert load_settings("staging", config_dir).evaluation.thresholds.roc_auc == 0.72
    with pytest.raises(ConfigError) as err:
        load_settings("dev", config_dir)
    assert f"{config_dir / 'base.yaml'}: evaluation.thresholds.roc_auc:" in str(err.value)


def test_wrong_type_and_bad_cron_and_bad_mig_profile(config_dir):
    patch(config_dir, "prod", {"training": {"workers": "four"}, "retraining": {"schedule": "weekly"},
                               "serving": {"canary_percent": 150}})
    patch(config_dir, "dev", {"training": {"resources": {"gpu": {"resource": "nvidia.com/mig-big"}}}})
    with pytest.raises(ConfigError) as err:
        load_settings("prod", config_dir)
    lines = str(err.value).splitlines()
    assert any("prod.yaml: training.workers:" in line for line in lines)
    assert any("prod.yaml: retraining.schedule:" in line for line in lines)
    assert any("prod.yaml: serving.canary_percent:" in line and "100" in line for line in lines)
    with pytest.raises(ConfigError, match=r"dev.yaml: training.resources.gpu.resource: String should match"):
        load_settings("dev", config_dir)


def test_cluster_env_cannot_use_local_torchrun(config_dir):
    patch(config_dir, "staging", {"training": {"backend": "torchrun"}})
    with pytest.raises(ConfigError, match="'torchrun' trains on this machine, but kfp.host sends the pipeline to "
                                          "a cluster"):
        load_settings("staging", config_dir)


def test_embedded_env_cannot_use_a_cluster_backend(config_dir):
    """Given the embedded env (no kfp.host) asking for a cluster backend, Then config says to set kfp.host."""
    patch(config_dir, "local", {"training": {"backend": "pytorchjob"},
                                "kfp": {"pipeline_root": "s3://flywheel-local/pipelines"}})
    with pytest.raises(ConfigError, match="'pytorchjob' runs on a cluster: set kfp.host"):
        load_settings("local", config_dir)


def test_file_source_needs_a_table_uri(config_dir):
    patch(config_dir, "local", {"dataset": {"source": "file"}})
    with pytest.raises(ConfigError, match="needs dataset.uri"):
        load_settings("local", config_dir)
    patch(config_dir, "local", {"dataset": {"source": "file", "uri": "data/customers.xlsx"}})
    with pytest.raises(ConfigError, match="must end in .csv"):
        load_settings("local", config_dir)


def test_the_id_column_cannot_be_a_feature_or_the_target(config_dir):
    # Serving accepts and echoes the id beside the features; as a feature too it would be both.
    patch(config_dir, "local", {"dataset": {"id_column": "income"}})
    with pytest.raises(ConfigError, match="config/local.yaml: dataset: id_column 'income' is also the target or a f"):
        load_settings("local", config_dir)


def test_unknown_env_missing_file_and_broken_yaml(config_dir):
    with pytest.raises(ConfigError, match="unknown environment 'qa': .*; environments: dev, local, prod, staging"):
        load_settings("qa", config_dir)
    (config_dir / "dev.yaml").unlink()  # an env is its file: without it, dev no longer exists
    with pytest.raises(ConfigError, match=r"unknown environment 'dev': no .*dev.yaml; environments: local, prod, "):
        load_settings("dev", config_dir)
    (config_dir / "base.yaml").rename(config_dir / "base.yaml.bak")
    with pytest.raises(ConfigError, match=r"base.yaml: file not found"):
        load_settings("local", config_dir)
    (config_dir / "base.yaml.bak").rename(config_dir / "base.yaml")
    (config_dir / "prod.yaml").write_text("training: [unclosed\n")
    with pytest.raises(ConfigError, match=r"prod.yaml: not valid YAML"):
        load_settings("prod", config_dir)


def test_search_space_only_names_real_hyperparameters(config_dir):
    patch(config_dir, "base", {"tuning": {"search_space": {"learning_rte": [0.1]}}})
    with pytest.raises(ConfigError, match=r"tuning.search_space: .*unknown hyperparameters \['learning_rte'\]"):
        load_settings("local", config_dir)


def test_credentials_inside_uris_are_refused(config_dir):
    patch(config_dir, "staging", {"mlflow": {"tracking_uri": "https://ml:hunter2@mlflow.example.internal"}})
    with pytest.raises(ConfigError, match="mlflow.tracking_uri embeds credentials") as err:
        load_settings("staging", config_dir)
    assert "hunter2" not in str(err.value)


def test_cluster_training_needs_an_object_store_pipeline_root(config_dir):
    data = yaml.safe_load((config_dir / "dev.yaml").read_text())
    del data["kfp"]["pipeline_root"]
    write(config_dir, "dev", data)
    with pytest.raises(ConfigError, match="needs kfp.pipeline_root on an object store"):
        load_settings("dev", config_dir)


# --------------------------------------------------------------------------------------------
# A new environment is a new file


def add_qa(config_dir):
    """config/qa.yaml: a copy of dev.yaml in its own namespace."""
    (config_dir / "qa.yaml").write_text((config_dir / "dev.yaml").read_text().replace("flywheel-dev", "flywheel-qa")
                                        .replace("credit-default-dev", "credit-default-qa"))


def test_a_new_env_file_is_discovered_validated_checked_and_compiled(config_dir, tmp_path):
    """Given config/qa.yaml copied from dev.yaml, When config is loaded, checked and compiled,
    Then qa is an environment like the others, with no code change."""
    from pipelines.catalog import PIPELINES, check_all, compile_pipeline, load_compiled

    add_qa(config_dir)
    assert environments(config_dir) == ["dev", "local", "prod", "qa", "staging"]

    qa = load_settings("qa", config_dir)
    assert qa.env == "qa" and qa.namespace == "flywheel-qa" and not qa.embedded
    assert qa.training == load_settings("dev", config_dir).training
    assert set(load_all(config_dir)) == {"dev", "local", "prod", "qa", "staging"}

    assert check_all(config_dir) == {env: [] for env in ("dev", "local", "prod", "qa", "staging")}

    for name in PIPELINES:
        spec = load_compiled(compile_pipeline(qa, name, tmp_path / "qa"))
        defaults = {k: v.get("defaultValue") for k, v in spec["root"]["inputDefinitions"]["parameters"].items()}
        assert defaults["env"] == "qa"
        if "train_spec" in defaults:  # the training pipeline; monitoring's trigger targets qa's experiment
            assert defaults["train_spec"]["env"] == "qa" and defaults["train_spec"]["namespace"] == "flywheel-qa"
        elif "kfp_target" in defaults:  # the monitoring pipeline (scoring starts no runs)
            assert defaults["kfp_target"]["experiment"] == "credit-default-qa"
        assert {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()} == {qa.image.ref}


def test_unknown_env_lists_the_environments_that_exist(config_dir):
    """Given qa.yaml added, When an env with no file is asked for, Then the error lists every env there is."""
    add_qa(config_dir)
    with pytest.raises(ConfigError) as err:
        load_settings("uat", config_dir)
    message = str(err.value)
    assert f"unknown environment 'uat': no {config_dir / 'uat.yaml'}" in message
    assert message.endswith("environments: dev, local, prod, qa, staging")


def test_every_mistake_in_a_file_is_reported_with_file_and_key_path(config_dir):
    """Given qa.yaml with four mistakes in different sections, When it is loaded, Then one error
    names all four, each as <file>: <key path>: <what is wrong>."""
    add_qa(config_dir)
    patch(config_dir, "qa", {"training": {"workers": "two", "resources": {"gpus": 1}},
                             "serving": {"canary_percent": 150},
                             "evaluation": {"thresholds": {"f1": 2.0}}})
    with pytest.raises(ConfigError) as err:
        load_settings("qa", config_dir)
    lines = str(err.value).splitlines()
    qa_file = config_dir / "qa.yaml"
    expected = ("training.workers:", "training.resources.gpus: unknown key", "serving.canary_percent:",
                "evaluation.thresholds.f1:")
    for key in expected:
        assert any(line.startswith(f"{qa_file}: {key}") for line in lines), (key, lines)
    assert len(lines) == len(expected), lines
    # and `check` reports the same lines for qa while the other envs stay clean
    from pipelines.catalog import check_all

    problems = check_all(config_dir)
    assert problems["qa"] == lines
    assert all(problems[env] == [] for env in ("dev", "local", "prod", "staging"))


# --------------------------------------------------------------------------------------------
# `check` catches it first: quantities, cron fields, duplicate keys


@pytest.mark.parametrize("key, value, expected", [
    ("memory", "lots", "not a Kubernetes quantity: 'lots'"),
    ("memory", "8GB", "not a Kubernetes quantity: '8GB' (Kubernetes has no 'B' suffix: 8Gi or 8G)"),
    ("memory", "8", "memory '8' is 8 bytes, less than 1Mi; e.g. 8Gi or 8Mi"),
    ("memory", "1e3Mi", "not a Kubernetes quantity"),
    ("cpu", "two", "not a Kubernetes quantity: 'two'"),
    ("cpu", "0.0001", "less than 1m"),
])
def test_a_resource_that_is_not_a_kubernetes_quantity_names_file_and_key(config_dir, key, value, expected):
    patch(config_dir, "dev", {"training": {"resources": {key: value}}})
    with pytest.raises(ConfigError) as err:
        load_settings("dev", config_dir)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{config_dir / 'dev.yaml'}: training.resources.{key}: ") and expected in line, line
    assert "^(" not in line, "no raw regex"


def test_quantities_kubernetes_takes_pass_everywhere_they_are_set(config_dir):
    patch(config_dir, "dev", {"training": {"resources": {"cpu": 2, "memory": "1.5Gi"}},
                              "serving": {"cpu": "500m", "memory": "512Mi"},
                              "kfp": {"task_cpu": "250m", "task_memory": "1G"}})
    dev = load_settings("dev", config_dir)
    assert (dev.training.resources.cpu, dev.serving.cpu, dev.kfp.task_memory) == ("2", "500m", "1G")
    patch(config_dir, "dev", {"serving": {"memory": "lots"}, "kfp": {"task_cpu": "1 core"}})
    with pytest.raises(ConfigError) as err:
        load_settings("dev", config_dir)
    lines = str(err.value).splitlines()
    assert any(line.startswith(f"{config_dir / 'dev.yaml'}: serving.memory: ") for line in lines), lines
    assert any(line.startswith(f"{config_dir / 'dev.yaml'}: kfp.task_cpu: ") for line in lines), lines


@pytest.mark.parametrize("schedule, expected", [
    ("99 3 * * 1", "minute 99 is out of range 0-59"),
    ("0 24 * * 1", "hour 24 is out of range 0-23"),
    ("0 3 0 * *", "day of month 0 is out of range 1-31"),
    ("0 3 * 13 *", "month 13 is out of range 1-12"),
    ("0 3 * * 8", "day of week 8 is out of range 0-7"),
    ("0 3 * * mon-xyz", "day of week 'xyz' is not a number or a name"),
    ("*/0 3 * * *", "step '/0' never fires"),
    ("0 3 * *", "cron needs 5 fields"),
])
def test_a_cron_field_out_of_range_names_the_field_and_shows_an_example(config_dir, schedule, expected):
    patch(config_dir, "prod", {"retraining": {"schedule": schedule}})
    with pytest.raises(ConfigError) as err:
        load_settings("prod", config_dir)
    (line,) = str(err.value).splitlines()
    assert line.startswith(f"{config_dir / 'prod.yaml'}: retraining.schedule: ") and expected in line, line
    assert "e.g. '0 3 * * 1'" in line and "\\S" not in line, "an example, not the raw regex"


@pytest.mark.parametrize("schedule", ["0 3 * * 1", "*/15 0-6 1,15 jan-jun mon-fri", "30 2 * * 7", "0 0 ? * SUN"])
def test_valid_cron_expressions_pass(config_dir, schedule):
    patch(config_dir, "prod", {"retraining": {"schedule": schedule}})
    assert load_settings("prod", config_dir).retraining.schedule == schedule


def test_a_key_given_twice_is_an_error_with_file_line_and_key_path(config_dir):
    # Given local.yaml with `workers` twice under training, and a second top-level `tuning` block
    text = (config_dir / "local.yaml").read_text().replace("  workers: 2\n", "  workers: 2\n  workers: 4\n")
    (config_dir / "local.yaml").write_text(text + "tuning:\n  trials: 9\n")
    lines = text.splitlines()
    workers_line = lines.index("  workers: 2") + 1
    tuning_line = next(i for i, line in enumerate(lines) if line.startswith("tuning:")) + 1
    with pytest.raises(ConfigError) as err:
        load_settings("local", config_dir)
    local = config_dir / "local.yaml"
    # Then both are reported, each with the file, the key path and both lines, not merged silently
    assert str(err.value).splitlines() == [
        f"{local}: training.workers: duplicate key at line {workers_line + 1} (first at line {workers_line}); "
        "YAML would keep only the last one",
        f"{local}: tuning: duplicate key at line {len(lines) + 1} (first at line {tuning_line}); "
        "YAML would keep only the last one",
    ]
    from pipelines.catalog import check_all

    assert check_all(config_dir)["local"] == str(err.value).splitlines()
