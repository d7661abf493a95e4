"""kfp.local's task processes, forked from a process that has already imported what tasks import.

kfp.local's SubprocessRunner starts every task as a fresh `python -m kfp.dsl.executor_main`, and a
task spends most of its life importing before its first line of work: Great Expectations (~2.7 s),
torch (~1.3 s), MLflow and its SQL store (~1.5 s), scikit-learn and matplotlib (~1 s) in tasks of
2-5 s (`python -X importtime`). Here one zygote process (pipelines/zygote_process.py) imports them
once and forks a child per task that runs what kfp's command runs, with the caller's environment,
working directory and Ctrl-C disposition, its output streamed back line by line and its exit
status returned (the differences from a fresh process are listed there).

A task runs as kfp starts it, unchanged, whenever the zygote cannot serve it exactly: not started
or still importing, busy with another task, the caller's environment changed since it started or
the task sets a variable to another value (a library may read it at import), or a command that is
not the one kfp 2.17 builds. `FLYWHEEL_TASK_ZYGOTE=0` turns it off; it is Linux only.

Not `multiprocessing`'s forkserver: its first child waits until every preload is imported (no
"ready" to ask), and each child re-imports the parent's `__main__`. kfp.local has no hook for how a
task process starts, so `forked_tasks()` swaps `run_local_subprocess` while a pipeline runs.
"""
from __future__ import annotations

import atexit
import functools
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager, suppress

from pipelines.zygote_process import HEADER, READY, exactly

# What the tasks import, in the order tasks first need them; a module missing here is imported
# by the task itself, with its own error.
PRELOAD = (
    "kfp.dsl.executor_main", "pandas", "pyarrow.parquet",
    "great_expectations", "stages.validation",
    "mlflow", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "torch", "model.loader", "training.backends.torchrun", "stages.registry",
    "sklearn.metrics", "matplotlib.figure", "stages.evaluation_report", "deployment.deployers",
)
PROBE_SECONDS = 20.0  # a forked child's torch work takes ~0.1 s; past this the zygote never says ready


@functools.cache
def _kfp_script() -> str | None:
    """The shell script kfp.local runs for every lightweight component, as it runs it: kfp's own
    template with `python3` replaced by this interpreter (kfp.local subprocess_task_handler); None
    when a kfp of another shape cannot say."""
    try:
        from kfp.dsl.component_factory import _get_command_and_args_for_lightweight_component
        from kfp.local.subprocess_task_handler import replace_python_executable

        command, _ = _get_command_and_args_for_lightweight_component(_kfp_script.__wrapped__)
        return replace_python_executable(command[:3], sys.executable)[2]
    except Exception:  # then every task starts as kfp starts it
        return None


def parse_command(full_command: list[str]) -> tuple[str, list[str]] | None:
    """(component source, executor arguments) from the command kfp.local runs for a lightweight
    component, or None for any other command (a later kfp's script that does one more thing)."""
    script = _kfp_script()
    if script and len(full_command) >= 4 and full_command[:2] == ["sh", "-ec"] and full_command[2] == script:
        return full_command[3], list(full_command[4:])
    return None


def _comparable(env) -> dict:
    # pytest rewrites PYTEST_CURRENT_TEST at every test phase; nothing reads it at import
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


class Zygote:
    """One zygote process and the socket to it; tasks go through it one at a time."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD, probe_seconds: float = PROBE_SECONDS) -> None:
        ours, theirs = socket.socketpair()
        self.env = dict(os.environ)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipelines.zygote_process", str(theirs.fileno()), str(probe_seconds), *preload],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={**self.env, "_KFP_RUNTIME": "true"})  # kfp imports as in a task
        theirs.close()
        self.sock = ours
        self.ready = False
        self.lock = threading.Lock()
        self.forked = 0

    def same_environment(self, env_vars: dict | None = None) -> bool:
        """The caller's environment, and the task's own variables, are the zygote's."""
        if any(self.env.get(k) != v for k, v in (env_vars or {}).items()):
            return False
        return _comparable(os.environ) == _comparable(self.env)

    def usable(self, env_vars: dict | None = None) -> bool:
        """Ready (checked without waiting), alive, and started in the task's environment."""
        if self.process.poll() is not None or not self.same_environment(env_vars):
            return False
        if not self.ready:
            readable, _, _ = select.select([self.sock], [], [], 0)
            self.ready = bool(readable) and self.sock.recv(1) == READY
        return self.ready

    def run(self, source: str, args: list[str], env_vars: dict | None) -> int:
        """Run one task in a forked child: its output printed here as kfp prints it, its exit
        status returned."""
        env = {**os.environ, **(env_vars or {}), "_KFP_RUNTIME": "true"}
        request = json.dumps({"source": source, "args": args, "env": env, "cwd": os.getcwd(),
                              "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN}).encode()
        read_fd, write_fd = os.pipe()
        try:
            socket.send_fds(self.sock, [HEADER.pack(len(request))], [write_fd])
            self.sock.sendall(request)
            (pid,) = HEADER.unpack(exactly(self.sock, HEADER.size))
        except (OSError, EOFError) as err:
            os.close(read_fd)
            self.close()
            raise RuntimeError(f"the task zygote died before starting the task ({err}); "
                               "FLYWHEEL_TASK_ZYGOTE=0 starts tasks without it") from None
        finally:
            os.close(write_fd)
        self.forked += 1
        print(f"task process {pid}: forked from the task zygote (FLYWHEEL_TASK_ZYGOTE=0 starts it anew)")
        try:
            with os.fdopen(read_fd, encoding="utf-8", errors="replace") as output:
                for line in iter(output.readline, ""):
                    print(line, end="")
            print("\n")  # kfp's separator after a task's log
            (code,) = HEADER.unpack(exactly(self.sock, HEADER.size))
        except (OSError, EOFError) as err:
            self.close()
            raise RuntimeError(f"the task zygote died while task process {pid} ran ({err}); "
                               "FLYWHEEL_TASK_ZYGOTE=0 starts tasks without it") from None
        except BaseException:  # Ctrl-C: the task goes too; the reply stream is mid-message
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            self.close()
            raise
        return code

    def close(self) -> None:
        """Stop the zygote now (it holds no state; a task it forked finishes on its own)."""
        self.ready = False
        self.sock.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


_zygote: Zygote | None = None
_guard = threading.RLock()  # forked_tasks() holds it while shared() takes it


def shared() -> Zygote | None:
    """This process's zygote, (re)started when it is missing, dead or started with another
    environment; None where turned off, and off Linux: Windows has no fork, and on macOS a fork
    after system frameworks are loaded is unsafe (CPython's multiprocessing spawns there, bpo-33725)."""
    global _zygote
    if os.environ.get("FLYWHEEL_TASK_ZYGOTE", "1") == "0" or sys.platform != "linux":
        return None
    with _guard:
        if _zygote is not None and (_zygote.process.poll() is not None or not _zygote.same_environment()):
            _zygote.close()
            _zygote = None
        if _zygote is None:
            _zygote = Zygote(PRELOAD)
            atexit.register(_zygote.close)
        return _zygote


_entered: list[Zygote | None] = []  # forked_tasks() contexts open in this process, innermost last


@contextmanager
def forked_tasks(zygote: Zygote | None = None):
    """While inside, kfp.local's SubprocessRunner tasks are forked from the zygote (this
    process's shared one by default) when it can serve them, and started by kfp as usual when it
    cannot. Nested or overlapping contexts restore kfp's own launcher when the last one closes."""
    from kfp.local import subprocess_task_handler as handler

    with _guard:
        if not _entered:
            _install(handler)
        _entered.append(zygote or shared())
        mine = _entered[-1]
    try:
        yield mine
    finally:
        with _guard:
            _entered.remove(mine)
            if not _entered:
                handler.run_local_subprocess = _original


_original = None


def _install(handler) -> None:
    global _original
    _original = original = handler.run_local_subprocess

    def run_local_subprocess(full_command, env_vars=None):
        zygote, parsed = (_entered[-1] if _entered else None), parse_command(full_command)
        if zygote is None or parsed is None or not zygote.lock.acquire(blocking=False):
            return original(full_command=full_command, env_vars=env_vars)
        try:
            if not zygote.usable(env_vars):
                return original(full_command=full_command, env_vars=env_vars)
            return zygote.run(*parsed, env_vars)
        finally:
            zygote.lock.release()

    handler.run_local_subprocess = run_local_subprocess
