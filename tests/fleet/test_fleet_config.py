"""Config declares each cluster env's clusters; mistakes name the file, the key and the rule."""
import pytest
import yaml

from pipelines.config import ConfigError, load_settings
from tests.pipelines.test_config import patch


def test_the_example_fleet():
    """dev on one MIG cluster, staging on one, prod on two zones with whole A100s."""
    dev, staging, prod = (load_settings(env).fleet for env in ("dev", "staging", "prod"))
    assert [(c.name, c.gpu.resource) for c in dev.clusters] == [("dev-mig", "nvidia.com/mig-1g.5gb")]
    assert len(staging.clusters) == 1
    assert {c.zone for c in prod.clusters} == {"eu-west-1a", "eu-west-1b"}
    assert [c.gpu.resource for c in prod.clusters if "training" in c.runs] == ["nvidia.com/gpu"]
    assert all("serving" in c.runs and "monitoring" in c.runs for c in prod.clusters)
    assert load_settings("local").fleet.clusters == []


def test_a_cluster_env_without_clusters_is_refused(config_dir):
    data = yaml.safe_load((config_dir / "staging.yaml").read_text())
    data["fleet"]["clusters"] = []
    (config_dir / "staging.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="fleet.clusters is empty"):
        load_settings("staging", config_dir)


def test_the_embedded_env_names_no_cluster(config_dir):
    patch(config_dir, "local", {"fleet": {"clusters": [{"name": "x", "zone": "a", "runs": ["serving"]}]}})
    with pytest.raises(ConfigError, match="fleet.clusters is for cluster environments"):
        load_settings("local", config_dir)


@pytest.mark.parametrize("change, message", [
    ({"gpu": None}, "runs training but declares no gpu pool"),
    ({"gpu": {"product": "A100", "resource": "nvidia.com/gpu", "quota": 2}},
     "is not what training asks for \\(training.resources.gpu.resource 'nvidia.com/mig-1g.5gb'\\)"),
    ({"predictor_replicas": 0}, "scale to zero\\) needs serving.deployment_mode 'Knative'"),
    ({"name": "Dev_Cluster"}, "fleet.clusters.0.name: String should match pattern"),
    ({"runs": ["serving", "serving"]}, "runs lists an entry twice"),
])
def test_cluster_mistakes_name_the_file_key_and_rule(config_dir, change, message):
    data = yaml.safe_load((config_dir / "dev.yaml").read_text())
    data["fleet"]["clusters"][0].update(change)
    (config_dir / "dev.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as err:
        load_settings("dev", config_dir)
    assert "dev.yaml" in str(err.value)


def test_every_part_of_the_lifecycle_runs_somewhere(config_dir):
    data = yaml.safe_load((config_dir / "prod.yaml").read_text())
    for cluster in data["fleet"]["clusters"]:
        cluster["runs"] = ["training", "serving"] if cluster.get("gpu") else ["serving"]
    (config_dir / "prod.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="no cluster runs monitoring"):
        load_settings("prod", config_dir)


def test_auth_issuer_and_keys_go_together(config_dir):
    patch(config_dir, "staging", {"fleet": {"auth": {"jwks_uri": None}}})
    with pytest.raises(ConfigError, match="auth.issuer and auth.jwks_uri go together"):
        load_settings("staging", config_dir)


def test_shadow_promotion_is_offered_where_a_mirror_route_can_serve_a_challenger(config_dir):
    # dev serves in Standard mode: an Istio route mirrors to the challenger (pipelines/shadow_cluster.py)
    patch(config_dir, "dev", {"evaluation": {"shadow": {"rows": 100}}})
    assert load_settings("dev", config_dir).evaluation.shadow.rows == 100
    # staging serves in Knative mode, whose routes are Knative's: refused, naming the file and the rule
    patch(config_dir, "staging", {"evaluation": {"shadow": {"rows": 100}}})
    with pytest.raises(ConfigError, match="staging.yaml: .*evaluation.shadow needs serving.deployment_mode "
                                          "Standard"):
        load_settings("staging", config_dir)
