"""`flywheel serve` on this machine: the champion behind fixed loopback ports, following the
registry's `champion` alias, with its payload events logged to a monitor sink.

    client -> front (PORT, gRPC port)  -> the server(s) of version N (free ports): one process,
                                          or transformer + predictor (serving.topology)
                                       -> ... of version M, once the alias moves to M

Every `poll_seconds` the alias is read; when it moved (a rollback, a promotion, a new champion
from training), version M is downloaded and its pair started on free ports and ready-checked beside
N; then the front sends new REST requests (also on a keep-alive connection opened before) and new
gRPC connections to M, waits for the REST requests N has in flight, and stops N (it drains the
rest), so no request fails during the swap. A pair that does not start leaves N serving.

When the env logs no payloads (`serving.payload_logging.url` null), the monitor service
(`python -m monitoring.service`) runs beside it on a free loopback port and writes its windows to
`monitoring.sink.root`, where `flywheel monitor --env ENV` reads them.

While it runs, `runs/serve/<env>.json` says what it serves (pid, url, version, shadow), so that
`flywheel rollback` and `deploy` can wait for the swap and print a URL that answers.

Shadow: when `runs/serve/<env>.shadow.json` names a version (`flywheel shadow start` writes it),
the next poll starts that version's pair beside the champion as `<V>-shadow` and the front mirrors
each REST inference request to it (`pipelines.mirror`: fire-and-forget, bounded, counted); when
the file goes (`flywheel shadow stop`), the shadow pair is stopped. The shadow never answers a
client, and a shadow that dies or hangs changes nothing for the champion's clients.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.config import Settings
from pipelines.front import Front
from pipelines.serving import SERVE_DIR, example_records, state_path


def with_payload_sink(settings: Settings, sink_url: str) -> Settings:
    """The env with payload events going to the sink at `sink_url` (mode all: the sink pairs request and response)."""
    from specs import PayloadLogging

    logging = PayloadLogging(url=f"{sink_url}/events", mode="all",
                             sample_rate=settings.serving.payload_logging.sample_rate)
    return settings.model_copy(update={"serving": settings.serving.model_copy(update={"payload_logging": logging})})


class Follower:
    """The champion served behind a `Front` on `host`:`port`, swapped when the alias moves."""

    def __init__(self, settings: Settings, port: int, *, host: str = "127.0.0.1", poll_seconds: float = 5.0,
                 sink: bool = True, echo: Callable[[str], None] = print):
        self.settings, self.port, self.host = settings, port, host
        self.poll_seconds, self.echo, self.want_sink = poll_seconds, echo, sink
        self.name = settings.mlflow.registered_model
        self.pairs: list = []  # (version, LocalServing), the current one last
        self.front: Front | None = None
        self.sink = None
        self.failed: dict | None = None
        self.shadow: tuple | None = None  # (version, LocalServing) of the challenger on mirrored traffic
        self.shadow_failed: dict | None = None
        self._stack = contextlib.ExitStack()
        self._tmp = ""

    @property
    def version(self) -> str:
        return self.pairs[-1][0]

    @property
    def serving(self):
        return self.pairs[-1][1]

    def start(self) -> Follower:
        """The port checked, the champion found, the sink, the champion's pair, then the front on the
        fixed ports; all stopped again on failure (RuntimeError, LookupError: no champion)."""
        from deployment.loopback import free_port
        from pipelines.serving import local_champion
        from serving.ports import port_in_use

        problem = port_in_use(self.host, self.port)
        if problem:  # before minutes of downloads and server starts
            raise RuntimeError(problem)
        try:
            self._tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="flywheel-serve-"))
            version, model_dir = local_champion(self.settings, str(Path(self._tmp) / "v-first"))
            if self.want_sink and not self.settings.serving.payload_logging.url:
                import yaml

                from pipelines.arguments import monitor_config
                from pipelines.loop import MonitorService

                SERVE_DIR.mkdir(parents=True, exist_ok=True)
                # The env's sink settings (buffer, flushes) through the same rendered file a cluster uses.
                config = SERVE_DIR / f"monitor-{self.settings.env}.yaml"
                config.write_text(yaml.safe_dump(monitor_config(self.settings), sort_keys=False))
                # MonitorService only str()s its root: a storage URI passes through unchanged.
                root = self.settings.monitoring.sink.root
                self.sink = self._stack.enter_context(MonitorService(root, SERVE_DIR / "monitor.log", config))
                self.settings = with_payload_sink(self.settings, self.sink.url)
            self.pairs.append((version, self._start_pair(version, model_dir)))
            self.front = Front(self.host, {"entry_http": self.port, "entry_grpc": free_port()},
                               http=("entry_http",))
            self.front.start(self.serving.ports)
            self._write_state()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_pair(self, version: str, model_dir: str, served_as: str | None = None):
        from deployment.loopback import LocalServing

        served_as = served_as or version
        return LocalServing(model_dir, self.name, self.settings.serving, SERVE_DIR / f"v{served_as}",
                            decision_threshold=self.settings.evaluation.decision_threshold,
                            model_version=served_as).start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def banner(self) -> str:
        front, ports = self.front.ports, self.serving.ports
        record = json.dumps({"instances": example_records(self.settings, self.version, rows=1)})
        sink = (f"  monitor sink {self.sink.url} -> {self.settings.monitoring.sink.root} "
                f"(`flywheel monitor --env {self.settings.env}` reads it)\n" if self.sink else "")
        entry = f"{self.url} (v1, v2 REST), gRPC {self.host}:{front['entry_grpc']}"
        servers = (f"  server       {entry}, one process (serving.topology single)\n" if self.serving.single else
                   f"  transformer  {entry}\n"
                   f"  predictor    {self.serving.predictor_url}, gRPC 127.0.0.1:{ports['predictor_grpc']}\n")
        return (f"serving {self.name} v{self.version}, following its champion alias every {self.poll_seconds:g} s\n"
                f"{servers}"
                f"{sink}  logs         {SERVE_DIR}/\n"
                f"try:\n  curl -s {self.url}/v1/models/{self.name}:predict -H 'content-type: application/json' "
                f"-d '{record}'\nCtrl-C stops serving.")

    def _write_state(self) -> None:
        state = {"pid": os.getpid(), "env": self.settings.env, "model": self.name, "version": self.version,
                 "url": self.url, "poll_seconds": self.poll_seconds, "failed": self.failed,
                 "sink": self.sink.url if self.sink else None,
                 "shadow": ({"version": self.shadow[0], "url": self.shadow[1].url,
                             "mirror": self.front.mirror_stats() if self.front else {}} if self.shadow else None),
                 "shadow_failed": self.shadow_failed}
        path = state_path(self.settings.env)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_text(json.dumps(state))
        path.with_suffix(".tmp").replace(path)  # atomic: a reader never sees half a file

    def start_shadow(self, version: str) -> None:
        """Serve `version` as `<version>-shadow` beside the champion and mirror REST inference
        requests to it (a pair that does not start is recorded in the state, nothing else changes)."""
        from mlflow.exceptions import MlflowException

        from deployment.loopback import ServingFailed
        from monitoring.shadow import shadow_version
        from stages.versions import download_model_dir
        from storage.endpoints import Unreachable

        self.stop_shadow()
        try:
            model_dir = download_model_dir(self.settings.mlflow.tracking_uri, self.name, version,
                                           str(Path(self._tmp) / f"shadow-v{version}-{time.monotonic_ns()}"))
            pair = self._start_pair(version, model_dir, served_as=shadow_version(version))
        except (ServingFailed, MlflowException, OSError, ValueError, Unreachable) as err:
            self.shadow_failed = {"version": version, "error": f"shadow v{version} did not start: {str(err)[:300]}"}
            self.echo(f"error: {self.shadow_failed['error']}; serving v{self.version} without a shadow")
        else:
            self.shadow, self.shadow_failed = (version, pair), None
            self.front.mirror_to(pair.ports["entry_http"])
            self.echo(f"shadowing: v{version} gets a copy of every REST inference request "
                      f"(clients get v{self.version})")
        self._write_state()

    def stop_shadow(self) -> dict[str, int]:
        """Stop mirroring and the shadow pair; the mirror's final counts ({} when there was none)."""
        if self.shadow is None:
            return {}
        counts = self.front.mirror_to(None) if self.front else {}
        version, pair = self.shadow
        self.shadow = None
        pair.stop()
        self.echo(f"shadow v{version} stopped: {counts}")
        self._write_state()
        return counts

    def _follow_shadow(self) -> None:
        """Start or stop the shadow as the request file says (`flywheel shadow start|stop`)."""
        from pipelines.shadow import read_request

        wanted = read_request(self.settings.env)
        current = self.shadow[0] if self.shadow else None
        if wanted == current or (wanted and (self.shadow_failed or {}).get("version") == wanted):
            if self.shadow:
                self._write_state()  # fresh mirror counts for `flywheel shadow report`
            return
        if wanted is None:
            self.stop_shadow()
        else:
            self.start_shadow(wanted)

    def alive(self) -> bool:
        sink_alive = self.sink is None or self.sink.proc.poll() is None
        return sink_alive and all(process.alive() for process in self.serving.processes)

    def poll(self) -> None:
        """Follow the champion alias, then the shadow request."""
        self._poll_champion()
        self._follow_shadow()

    def _poll_champion(self) -> None:
        """Swap to the champion if the alias moved (and it is not a version that just failed to start)."""
        from mlflow.exceptions import MlflowException

        from stages.versions import CHAMPION, version_behind
        from storage.endpoints import Unreachable

        try:
            wanted = version_behind(self.settings.mlflow.tracking_uri, self.name, CHAMPION)
        except (MlflowException, OSError, Unreachable) as err:  # a registry blip never stops serving
            self.echo(f"warning: cannot read the champion alias ({str(err).splitlines()[0][:200]}); "
                      f"still serving v{self.version}")
            return
        if wanted is None or wanted == self.version or (self.failed or {}).get("version") == wanted:
            return
        self.swap(wanted)

    def swap(self, version: str) -> None:
        """Start `version` beside the current pair (ready-checked: its model loaded), point the front at
        it, stop the old pair. No smoke request: it would be logged as the new version's traffic."""
        from mlflow.exceptions import MlflowException

        from deployment.loopback import ServingFailed
        from stages.versions import download_model_dir
        from storage.endpoints import Unreachable

        self.echo(f"champion alias moved to v{version}: starting it beside v{self.version}")
        try:
            model_dir = download_model_dir(self.settings.mlflow.tracking_uri, self.name, version,
                                           str(Path(self._tmp) / f"v{version}-{time.monotonic_ns()}"))
            self.pairs.append((version, self._start_pair(version, model_dir)))
        except (ServingFailed, MlflowException, OSError, ValueError, Unreachable) as err:
            self.failed = {"version": version, "error": f"v{version} did not start: {str(err)[:300]}"}
            self._write_state()
            self.echo(f"error: {self.failed['error']}; still serving v{self.version}")
            return
        old_version, old = self.pairs[0]
        self.front.point(self.serving.ports)
        self.failed = None
        self._write_state()
        self.echo(f"now serving {self.name} v{version} at {self.url} (was v{old_version}); "
                  + ("one process" if self.serving.single else f"predictor {self.serving.predictor_url}"))
        # REST requests already sent to the old pair are answered first: on SIGTERM uvicorn would
        # close a connection whose request it has not read yet as an idle one.
        if not self.front.drain(old.ports, timeout=self.settings.serving.ready_timeout_seconds):
            self.echo(f"warning: v{old_version} still had requests in flight; stopping it")
        old.stop()  # SIGTERM: the old pair finishes the requests it has in flight (gRPC too), then exits
        self.pairs = self.pairs[1:]

    def run(self) -> None:
        """Poll until a server exits (RuntimeError) or the caller is interrupted (KeyboardInterrupt)."""
        next_poll = time.monotonic() + self.poll_seconds
        while self.alive():
            if time.monotonic() >= next_poll:
                self.poll()
                next_poll = time.monotonic() + self.poll_seconds
            time.sleep(0.25)
        raise RuntimeError(f"a server exited: see {SERVE_DIR}/*.log")

    def stop(self) -> None:
        """Front first (no new connections), then the servers, then the sink (it flushes on SIGTERM)."""
        if self.front is not None:
            self.front.stop()
        if self.shadow is not None:
            self.shadow[1].stop()
        for _, serving in reversed(self.pairs):
            serving.stop()
        with contextlib.suppress(OSError, ValueError):
            state = json.loads(state_path(self.settings.env).read_text())
            if state.get("pid") == os.getpid():
                state_path(self.settings.env).unlink()
        self._stack.close()
