"""`flywheel shadow` on a cluster env (pipelines/shadow_cluster.py) against the fake Kubernetes API
(every body held to the vendored KServe and Istio CRDs) and a real SQLite MLflow registry: start
creates the challenger's InferenceService (placed as the live champion is) and the mirror route and
leaves the champion alone, a second start updates them, stop deletes both and promotes only on a
passing report over rows paired as a cluster logs them (by x-request-id); the CLI runs all three,
and the dry run and the CLI's one-line errors need no server."""
import functools
import json
import time
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa
import pytest
import yaml
from mlflow import MlflowClient
from typer.testing import CliRunner

import crds
import storage
from deployment.deployers import deploy
from deployment.inferenceservice import MODEL_VERSION, ServedModel
from fleet.validate import problems
from gateways.kube_api import INFERENCE_SERVICES, KubeApi
from monitoring.windows import parquet_bytes, window_file
from pipelines import cli, cli_app, shadow_cluster
from pipelines.config import load_settings
from specs.evaluation import ShadowSpec
from stages.registry import CHALLENGER
from stages.versions import CHAMPION, PREVIOUS_CHAMPION
from tests.fakes.kube_api_server import fake_kserve  # noqa: F401 - the fixture
from tests.support import free_port

NAME, NS = "credit-default", "flywheel-dev"
CHALLENGER_ISVC, ROUTE = f"{NAME}-challenger", f"{NAME}-shadow"


def uri_of(version) -> str:
    return f"s3://flywheel-dev-artifacts/models/{version}/artifacts/model"


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """v1 the champion, v2 the challenger; a version's model directory is at `uri_of(version)`."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, uri)
    client.create_registered_model(NAME)
    for number in (1, 2, 3):
        client.create_model_version(NAME, source=str(tmp_path / f"v{number}"))
    client.set_registered_model_alias(NAME, CHAMPION, "1")
    client.set_registered_model_alias(NAME, CHALLENGER, "2")
    monkeypatch.setattr("stages.versions.model_dir_uri", lambda tracking_uri, name, version: uri_of(version))
    return uri, client


def dev(tracking_uri: str, tmp_path, callers: tuple[str, ...] = (), **shadow) -> object:
    """dev (Standard mode: config takes `evaluation.shadow` there) shadowing 40 rows, the model
    called over the mesh from `callers` namespaces."""
    settings = load_settings("dev", overrides={
        "mlflow": {"tracking_uri": tracking_uri}, "serving": {"ready_timeout_seconds": 5},
        "fleet": {"auth": {"caller_namespaces": list(callers)}},
        "monitoring": {"sink": {"root": f"file://{tmp_path / 'sink'}"}},
        "evaluation": {"shadow": {"rows": 40, "max_regression": 0.01, **shadow}}})
    assert settings.evaluation.shadow == ShadowSpec(rows=40, max_regression=0.01, **shadow)
    return settings


def aliases(client) -> dict:
    return {alias: str(v) for alias, v in client.get_registered_model(NAME).aliases.items()}


PLACED = {"serviceAccountName": "flywheel-serving", "nodeSelector": {"pool": "serving"},
          "tolerations": [{"key": "serving", "operator": "Exists", "effect": "NoSchedule"}]}


def serve_champion(fake, settings) -> dict:
    """Champion v1 as a cluster holds it: deployed, and placed by the GitOps tree (fleet/serving.py)."""
    deploy(settings, ServedModel(NAME, "1", uri_of(1)), client_configuration=fake.configuration(),
           poll_interval=0.005, timeout=3, log=lambda _: None)
    KubeApi(fake.configuration()).patch(INFERENCE_SERVICES, NS, NAME, {"spec": {"predictor": PLACED}})
    return fake.isvc(NS, NAME)


def writes(fake) -> list[tuple[str, str]]:
    return [(r.method, r.path) for r in fake.requests if r.method != "GET"]


def start(fake, settings, lines: list) -> int:
    return shadow_cluster.start(settings, lines.append, kube=KubeApi(fake.configuration()), poll_interval=0.005)


def test_start_creates_the_challenger_and_the_route_and_leaves_the_champion_alone(fake_kserve, registry, tmp_path):
    # Given dev (Standard mode) serving champion v1, and v2 the registry's challenger
    settings, lines = dev(registry[0], tmp_path, callers=("payments",), percent=50), []
    champion = serve_champion(fake_kserve, settings)
    before = len(fake_kserve.requests)
    # When the shadow starts
    assert start(fake_kserve, settings, lines) == 0, lines
    # Then exactly two objects were created, the challenger's InferenceService and the route, nothing else written
    done = [(r.method, r.path) for r in fake_kserve.requests[before:] if r.method != "GET"]
    assert done == [("POST", f"/apis/serving.kserve.io/v1beta1/namespaces/{NS}/inferenceservices"),
                    ("POST", f"/apis/networking.istio.io/v1/namespaces/{NS}/virtualservices")]
    assert fake_kserve.warnings == []  # nothing pruned: both bodies are what the CRDs know
    isvc, route = fake_kserve.isvc(NS, CHALLENGER_ISVC), fake_kserve.virtual_service(NS, ROUTE)
    assert crds.schema_problems(isvc, crds.INFERENCESERVICE, "v1beta1") == []
    assert problems({k: v for k, v in route.items() if k != "status"}) == []
    # ... the challenger serves v2 as `2-shadow` (its own sink partition), from v2's model directory
    assert isvc["metadata"]["annotations"][MODEL_VERSION] == "2-shadow"
    args = isvc["spec"]["predictor"]["containers"][0]["args"]
    assert args[args.index("--model_version") + 1] == "2-shadow" and uri_of(2) in args
    # ... built as the champion is: the same hardening, the same payload logger to the env's sink
    for key in ("securityContext", "automountServiceAccountToken", "logger"):
        assert isvc["spec"]["predictor"].get(key) == champion["spec"]["predictor"].get(key), key
    assert isvc["spec"]["predictor"]["logger"]["url"] == settings.serving.payload_logging.url
    ours, theirs = isvc["spec"]["predictor"]["containers"][0], champion["spec"]["predictor"]["containers"][0]
    assert ours["securityContext"] == theirs["securityContext"] and ours["resources"] == theirs["resources"]
    # ... and placed as the live champion is: its service account is the one the monitor takes events from
    assert {k: isvc["spec"]["predictor"].get(k) for k in PLACED} == PLACED
    assert "topologySpreadConstraints" not in isvc["spec"]["predictor"]
    # ... the route answers with the champion and mirrors half of its requests to the challenger
    (http,) = route["spec"]["http"]
    assert http["route"][0]["destination"]["host"] == f"{NAME}-predictor.{NS}.svc.cluster.local"
    assert http["mirror"]["host"] == f"{CHALLENGER_ISVC}-predictor.{NS}.svc.cluster.local"
    assert http["mirrorPercentage"] == {"value": 50.0}
    # ... the champion is as it was, and the progress was told
    after = fake_kserve.isvc(NS, NAME)
    assert after["metadata"]["generation"] == champion["metadata"]["generation"]
    assert after["spec"] == champion["spec"] and after["metadata"]["annotations"][MODEL_VERSION] == "1"
    assert any(line.startswith(f"  waiting for {CHALLENGER_ISVC}") for line in lines)
    assert lines[-2].startswith(f"shadowing {NAME} v2 behind InferenceService {NS}/{NAME}: 50% of its requests")
    # ... and one line says which traffic is mirrored: the route is bound to the mesh only
    assert route["spec"]["gateways"] == ["mesh"]
    assert lines[-1] == "  mirrored: requests of in-mesh callers in payments; not the ingress gateway's"
    assert all(len(line) <= 80 for line in lines[-1:])


def test_starting_again_updates_rather_than_duplicates(fake_kserve, registry, tmp_path):
    # Given a running shadow of v2
    uri, client = registry
    serve_champion(fake_kserve, dev(uri, tmp_path))
    assert start(fake_kserve, dev(uri, tmp_path), []) == 0
    # When it starts again unchanged: nothing is written
    before = len(fake_kserve.requests)
    lines = []
    assert start(fake_kserve, dev(uri, tmp_path), lines) == 0
    assert [r.method for r in fake_kserve.requests[before:] if r.method != "GET"] == []
    assert any("unchanged" in line for line in lines)
    # When the challenger moves to v3 and the mirror share to 25%: both are patched, nothing created
    client.set_registered_model_alias(NAME, CHALLENGER, "3")
    before = len(fake_kserve.requests)
    assert start(fake_kserve, dev(uri, tmp_path, percent=25), []) == 0
    methods = [(r.method, r.path.rsplit("/", 1)[-1]) for r in fake_kserve.requests[before:] if r.method != "GET"]
    assert methods == [("PATCH", CHALLENGER_ISVC), ("PATCH", ROUTE)]
    assert fake_kserve.isvc(NS, CHALLENGER_ISVC)["metadata"]["annotations"][MODEL_VERSION] == "3-shadow"
    assert fake_kserve.virtual_service(NS, ROUTE)["spec"]["http"][0]["mirrorPercentage"] == {"value": 25.0}
    assert len(fake_kserve.isvcs) == 2 and len(fake_kserve.virtual_services) == 1


def test_start_without_a_challenger_or_a_champion_says_so_in_one_line(fake_kserve, registry, tmp_path):
    uri, client = registry
    lines = []
    assert start(fake_kserve, dev(uri, tmp_path), lines) == 1  # no champion InferenceService yet
    assert lines == [f"no champion to shadow: InferenceService {NS}/{NAME} does not exist "
                     "(`flywheel deploy --env dev` serves it)"]
    client.delete_registered_model_alias(NAME, CHALLENGER)
    lines.clear()
    assert start(fake_kserve, dev(uri, tmp_path), lines) == 1
    (line,) = lines
    assert line.startswith(f"no challenger: {NAME} has no `challenger` alias")
    assert writes(fake_kserve) == []


def write_rows(root: str, version: str, probabilities, request_ids, traces) -> None:
    n = len(probabilities)
    frame = pd.DataFrame({"request_id": request_ids, "instance": [i % 10 for i in range(n)], "trace_id": traces,
                          "event_time": pd.Timestamp.now(tz="UTC"), "model_name": NAME, "model_version": version,
                          "probability": probabilities, "prediction": ["1" if p >= 0.5 else "0" for p in probabilities],
                          "truth": pd.Series([None] * n, dtype=object)})
    storage.write_atomic(window_file(root, version, datetime.now(UTC)), parquet_bytes(pa.Table.from_pandas(frame)))


def shadowed(fake, registry, tmp_path, rows: int):
    """A running shadow of v2 behind v1 whose sink holds `rows` rows answered by both."""
    settings = dev(registry[0], tmp_path)
    serve_champion(fake, settings)
    assert start(fake, settings, []) == 0
    # As a cluster logs them: each pod's agent its own ce-id, both the call's x-request-id (Envoy's)
    traces = [f"t{i // 10}" for i in range(rows)]
    scores = [(i % 17) / 17 for i in range(rows)]
    write_rows(settings.monitoring.sink.root, "1", scores, [f"champion-{i // 10}" for i in range(rows)], traces)
    write_rows(settings.monitoring.sink.root, "2-shadow", scores, [f"copy-{i // 10}" for i in range(rows)], traces)
    return settings


def report_verdict(settings, tmp_path, monkeypatch) -> str:
    """`flywheel shadow --env dev report` (exit 0: a report was written, as on the local path): its verdict."""
    monkeypatch.setattr(cli_app, "load_settings", lambda env: settings)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli.app, ["shadow", "report", "--env", "dev"])
    assert result.exit_code == 0 and result.stdout.startswith("shadow v2 vs champion v1"), result.output
    return json.loads((tmp_path / shadow_cluster.REPORT_DIR / "dev" / "report.json").read_text())["verdict"]


def stop(fake, settings, tmp_path, lines: list) -> int:
    return shadow_cluster.stop(settings, lines.append, kube=KubeApi(fake.configuration()), out=tmp_path / "report")


def test_stop_after_a_passing_report_deletes_both_and_promotes_the_challenger(fake_kserve, registry, tmp_path,
                                                                              monkeypatch):
    # Given v2 shadowing v1 with the 40 rows evaluation.shadow asks for: its report passes
    settings, lines = shadowed(fake_kserve, registry, tmp_path, rows=40), []
    assert report_verdict(settings, tmp_path, monkeypatch) == "PROMOTE"
    # When the shadow stops
    assert stop(fake_kserve, settings, tmp_path, lines) == 0, lines
    # Then the route and the challenger are gone, the champion serves on, and v2 is the champion in the registry
    assert fake_kserve.virtual_service(NS, ROUTE) is None and fake_kserve.isvc(NS, CHALLENGER_ISVC) is None
    assert fake_kserve.isvc(NS, NAME)["metadata"]["annotations"][MODEL_VERSION] == "1"
    assert aliases(registry[1]) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
    assert lines[0].startswith("shadow v2 vs champion v1 (file://") and "40 rows mirrored" in lines[0]
    assert (tmp_path / "report" / "report.html").is_file() and (tmp_path / "report" / "report.json").is_file()
    assert lines[-1] == (f"promoted: v2 is the champion (was v1); `flywheel deploy --env dev` rolls "
                         f"InferenceService {NS}/{NAME} to it")


def test_stop_after_a_failing_report_deletes_both_and_promotes_nothing(fake_kserve, registry, tmp_path, monkeypatch):
    # Given v2 shadowing v1 with only 10 of the 40 rows asked for: its report does not pass
    settings, lines = shadowed(fake_kserve, registry, tmp_path, rows=10), []
    assert report_verdict(settings, tmp_path, monkeypatch) == "HOLD"
    # When the shadow stops
    assert stop(fake_kserve, settings, tmp_path, lines) == 1
    # Then both objects are gone, and the registry is as it was: v1 the champion, v2 the challenger
    assert fake_kserve.virtual_service(NS, ROUTE) is None and fake_kserve.isvc(NS, CHALLENGER_ISVC) is None
    assert aliases(registry[1]) == {CHAMPION: "1", CHALLENGER: "2"}
    assert lines[-1].startswith("not promoted: only 10 of the 40 shadow rows required; ")
    assert lines[-1].endswith("v2 stays the challenger (`flywheel shadow --env dev start` shadows it again)")
    # ... and stopping again finds nothing to delete, which is fine
    lines.clear()
    assert stop(fake_kserve, settings, tmp_path, lines) == 1
    assert f"VirtualService {NS}/{ROUTE} was not there" in lines


# --- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """dev with an MLflow that refuses connections and no kubeconfig at all."""
    port = free_port()
    settings = dev(f"http://127.0.0.1:{port}", tmp_path)
    monkeypatch.setattr(cli_app, "load_settings", lambda env: settings)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setenv("FLYWHEEL_FAIL_FAST", "1")
    return port


def test_the_dry_run_prints_both_objects_and_needs_no_server(offline):
    result = CliRunner().invoke(cli.app, ["shadow", "start", "--env", "dev", "--dry-run", "--version", "2",
                                          "--model-uri", uri_of(2)])
    assert result.exit_code == 0, result.output
    isvc, route = yaml.safe_load_all(result.stdout)
    assert isvc["metadata"]["name"] == CHALLENGER_ISVC and route["metadata"]["name"] == ROUTE
    assert isvc["metadata"]["annotations"][MODEL_VERSION] == "2-shadow"
    assert crds.schema_problems(isvc, crds.INFERENCESERVICE, "v1beta1") == [] and problems(route) == []
    # Without a version it needs the registry: one line naming the host
    started = time.monotonic()
    result = CliRunner().invoke(cli.app, ["shadow", "start", "--env", "dev", "--dry-run"])
    assert result.exit_code == 1 and time.monotonic() - started < 5
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot reach MLflow at http://127.0.0.1:{offline} "
                           f"(reading {NAME}@challenger): ")


def test_the_cli_starts_reports_and_stops_a_shadow_on_the_cluster(fake_kserve, registry, tmp_path, monkeypatch):
    # Given dev serving champion v1 and the CLI's kubeconfig pointing at the (fake) cluster
    settings = dev(registry[0], tmp_path)
    serve_champion(fake_kserve, settings)
    monkeypatch.setattr(cli_app, "load_settings", lambda env: settings)
    monkeypatch.setattr("gateways.kube_api.load_configuration", fake_kserve.configuration)
    monkeypatch.chdir(tmp_path)
    # the fake controller answers within milliseconds: poll it that often (the CLI's default is 5 s)
    monkeypatch.setattr(shadow_cluster, "start", functools.partial(shadow_cluster.start, poll_interval=0.005))
    invoke = lambda action: CliRunner().invoke(cli.app, ["shadow", action, "--env", "dev"])
    # When it starts: the challenger and the route are there
    result = invoke("start")
    assert result.exit_code == 0, result.output
    assert fake_kserve.isvc(NS, CHALLENGER_ISVC) and fake_kserve.virtual_service(NS, ROUTE)
    # ... and says that, with no caller namespace admitted to the model, nothing is mirrored yet
    assert "mirrored: nothing yet: no in-mesh caller may reach the model\n  (fleet.auth.caller_namespaces" \
        in result.stdout
    # When it reports before any mirrored row arrived: a report of no rows, which does not pass
    result = invoke("report")
    assert result.exit_code == 0 and result.stdout.startswith("shadow v2 vs champion v1"), result.output
    assert "0 rows mirrored" in result.stdout
    # When it stops: both are gone, nothing promoted
    result = invoke("stop")
    assert result.exit_code == 1 and f"deleted VirtualService {NS}/{ROUTE}" in result.stdout
    assert fake_kserve.isvc(NS, CHALLENGER_ISVC) is None and aliases(registry[1])[CHALLENGER] == "2"


def test_an_unreachable_cluster_names_its_host(registry, tmp_path, monkeypatch):
    from kubernetes import client as k8s

    from pipelines import shadow_cluster

    port = free_port()
    settings = dev(registry[0], tmp_path)
    # what a kubeconfig naming a server that is not there gives
    monkeypatch.setattr("gateways.kube_api.load_configuration",
                        lambda: k8s.Configuration(host=f"https://127.0.0.1:{port}"))
    monkeypatch.setenv("FLYWHEEL_FAIL_FAST", "1")
    started = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        shadow_cluster.start(settings, lambda line: None)
    assert time.monotonic() - started < 5
    assert str(err.value).startswith(f"cannot reach the Kubernetes API at https://127.0.0.1:{port} "
                                     f"(reading InferenceService {NS}/{NAME}): ")
    # ... and the CLI's start and stop say it in one line
    monkeypatch.setattr(cli_app, "load_settings", lambda env: settings)
    monkeypatch.chdir(tmp_path)
    for action, doing_ in (("start", f"reading InferenceService {NS}/{NAME}"),
                           ("stop", f"deleting VirtualService {NS}/{ROUTE}")):
        result = CliRunner().invoke(cli.app, ["shadow", action, "--env", "dev"])
        assert result.exit_code == 1
        (line,) = result.stderr.strip().splitlines()
        assert line.startswith(f"error: cannot reach the Kubernetes API at https://127.0.0.1:{port} ({doing_}): ")


def test_the_clis_refusals_are_one_line(offline, monkeypatch):
    for args, says in ((["shadow", "begin", "--env", "dev"], "unknown action 'begin'"),
                       (["shadow", "start", "--env", "dev", "--version", "2"], "go with --dry-run"),
                       (["shadow", "start", "--env", "dev", "--dry-run", "--model-uri", "s3://b/m"],
                        "--model-uri goes with --version"),
                       (["shadow", "stop", "--env", "dev", "--dry-run"], "--dry-run goes with start")):
        result = CliRunner().invoke(cli.app, args)
        assert result.exit_code == 1
        (line,) = result.stderr.strip().splitlines()
        assert says in line, line
    knative = load_settings("staging")
    monkeypatch.setattr(cli_app, "load_settings", lambda env: knative)
    result = CliRunner().invoke(cli.app, ["shadow", "start", "--env", "staging", "--dry-run"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "serving.deployment_mode Knative" in line and "needs Standard" in line

