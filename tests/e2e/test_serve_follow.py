"""A running `flywheel serve --env local` follows the registry's champion alias: `rollback` and
`rollback --to N` change what it answers, without a failed request during the swap; rolling back
twice does not flip-flop; the traffic it served is what `flywheel monitor` checks, and with none
logged for the champion it says so in one line."""
import shutil
import signal
import time

import httpx
import pytest
from typer.testing import CliRunner

import pipelines.cli as cli
from gateways.mlflow_api import client as _client
from pipelines.config import load_settings
from stages.versions import CHAMPION, PREVIOUS_CHAMPION
from tests.e2e.serving import NAME, Client, aliases, start_serve
from tests.support import free_port

runner = CliRunner()


class PooledClient(Client):
    """The same, over ONE keep-alive `httpx.Client`: every request after the first reuses the
    connection to the front that was opened before the swaps."""

    def __init__(self, port: int):
        super().__init__(port)
        self.client = httpx.Client(timeout=30)
        self.connections: set[tuple] = set()  # the client's local (address, port) of each connection used

    def predict(self) -> str:
        with self.client.stream("POST", self.url, content=self.body,
                                headers={"content-type": "application/json"}) as response:
            self.connections.add(response.extensions["network_stream"].get_extra_info("client_addr"))
            response.read()
        response.raise_for_status()
        return response.json()["model_version"]


def own_config(config, tmp_path, monkeypatch):
    """The registry's config copied under `tmp_path`: its relative sink root (resolved against the
    config's parent) becomes tmp_path/runs/monitoring, this test's alone."""
    copy = tmp_path / "config"
    shutil.copytree(config, copy)
    monkeypatch.setattr("pipelines.config.CONFIG_DIR", copy)
    monkeypatch.chdir(tmp_path)  # where the serve's state file is
    return copy, load_settings("local").monitoring.sink.root


def run_cli(args: list[str]):
    return runner.invoke(cli.app, args, env={"COLUMNS": "80"})


@pytest.mark.slow
def test_serve_follows_rollback_and_roll_forward_and_monitor_sees_its_traffic(registry, tmp_path,
                                                                               monkeypatch):
    tracking, config = registry
    config, _ = own_config(config, tmp_path, monkeypatch)
    port = free_port()
    proc, lines = start_serve(config, tmp_path, port)
    client, pooled = Client(port), PooledClient(port)
    try:
        banner = "".join(lines)
        assert f"serving {NAME} v2" in banner and "monitor sink http://127.0.0.1:" in banner, banner
        client.start()
        pooled.start()
        # When the user rolls back while it serves and clients call it
        result = run_cli(["rollback", "--env", "local"])
        assert result.exit_code == 0, result.output
        # Then rollback printed the URL that answers, once the running serve had swapped to v1
        assert f"live: {NAME} v1 (served) http://127.0.0.1:{port}\n" in result.output, result.output
        assert "now serves v1" in result.output and "v2 is tagged rolled_back" in result.output
        assert client.predict() == "1"
        # And rolling back again does not re-promote v2: there is nothing older than v1
        again = run_cli(["rollback", "--env", "local"])
        assert again.exit_code == 1 and "nothing older to roll back to" in again.output, again.output
        assert aliases(tracking) == {CHAMPION: "1"}
        assert _client(tracking).get_model_version(NAME, "2").tags.get("rolled_back") == "true"
        # When the user rolls forward to v2
        forward = run_cli(["rollback", "--env", "local", "--to", "2"])
        assert forward.exit_code == 0, forward.output
        assert f"live: {NAME} v2 (served) http://127.0.0.1:{port}\n" in forward.output, forward.output
        assert client.predict() == "2"
        assert aliases(tracking) == {CHAMPION: "2", PREVIOUS_CHAMPION: "1"}
        assert "rolled_back" not in _client(tracking).get_model_version(NAME, "2").tags
        time.sleep(1)
    finally:
        for each in (client, pooled):
            each.done.set()
            each.join(60)
        pooled.client.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=90)
    text = "".join(lines)
    assert proc.returncode == 0, text
    assert f"now serving {NAME} v1 at http://127.0.0.1:{port} (was v2)" in text, text
    assert f"now serving {NAME} v2 at http://127.0.0.1:{port} (was v1)" in text, text
    # No request failed across both swaps, and the answers went 2 -> 1 -> 2, also for the
    # keep-alive client, whose one connection to the front outlived both swaps
    for each in (client, pooled):
        assert each.failures == [], each.failures[:3]
        seen = [v for i, v in enumerate(each.versions) if i == 0 or each.versions[i - 1] != v]
        assert seen == ["2", "1", "2"], seen
    assert len(pooled.connections) == 1, pooled.connections
    assert not (tmp_path / "runs" / "serve" / "local.json").exists()  # a stopped serve leaves no state behind

    # When the user checks the traffic it served, in an 80-column terminal
    monitored = run_cli(["monitor", "--env", "local"])
    assert monitored.exit_code == 0, monitored.output
    header = next(line for line in monitored.output.splitlines() if f"{NAME} v2:" in line)
    assert int(header.split(": ")[1].split(" rows")[0].replace(",", "")) > 0, header
    assert "rows from" in header  # the sink root of this test's config: only the serve wrote there
    assert "column absent" not in monitored.output and "no traffic logged" not in monitored.output
    assert max(len(line) for line in monitored.output.splitlines()) <= 80, monitored.output


def test_monitor_without_traffic_for_the_champion_says_so_in_one_line(registry, tmp_path,
                                                                     monkeypatch):
    tracking, config = registry
    _, root = own_config(config, tmp_path, monkeypatch)
    champion = aliases(tracking)[CHAMPION]
    result = run_cli(["monitor", "--env", "local"])
    assert result.exit_code == 0, result.output
    assert result.output == f"no traffic logged for {NAME} v{champion} under {root}\n"


def test_deploy_without_a_running_serve_prints_no_url_of_a_stopped_server(registry, tmp_path,
                                                                         monkeypatch):
    own_config(registry[1], tmp_path, monkeypatch)
    result = run_cli(["deploy", "--env", "local"])
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first.startswith(f"live: {NAME} v") and first.endswith("(served)"), first
    assert "http://" not in result.output and "nothing serves it here now" in result.output
