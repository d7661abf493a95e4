"""kfp.local's task processes, forked from a process that has already imported what tasks import.

kfp.local's SubprocessRunner starts every task as a fresh `python -m kfp.dsl.executor_main`, and a
task spends most of its life importing before its first line of work: Great Expectations (~2.7 s),
torch (~1.3 s), MLflow and its SQL store (~1.5 s), scikit-learn and matplotlib (~1 s) in tasks of
2-5 s (`python -X importtime`). Here one zygote process imports them once; each task is a child
forked from it that does what kfp's command does: the component's source in a temp directory,
`kfp.dsl.executor_main` with the same arguments, the caller's environment and working directory,
its output streamed back line by line, its exit status returned, atexit handlers run.

A task falls back to kfp's own subprocess, unchanged, whenever the zygote cannot serve it exactly:
not started yet or still importing, busy with another task, the caller's environment changed since
it started (a library may read a variable at import), or a command of another shape.
`FLYWHEEL_TASK_ZYGOTE=0` turns it off.

Not `multiprocessing`'s forkserver: its first child waits until every preload is imported (no
"ready" to ask), and each child re-imports the parent's `__main__`. kfp.local has no hook for how a
task process starts, so `forked_tasks()` swaps `run_local_subprocess` while a pipeline runs.
"""
from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from contextlib import contextmanager, suppress

# What the tasks import, in the order tasks first need them; a module missing here is imported
# by the task itself, with its own error.
PRELOAD = (
    "kfp.dsl.executor_main", "pandas", "pyarrow.parquet",
    "great_expectations", "stages.validation",
    "mlflow", "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
    "torch", "model.loader", "training.backends.torchrun", "stages.registry",
    "sklearn.metrics", "matplotlib.figure", "stages.evaluation_report", "deployment.deployers",
)
HEADER = struct.Struct("!Q")
READY = b"R"


# -- the zygote process --------------------------------------------------------------------------

def serve(sock: socket.socket, preload: list[str]) -> None:
    """Import `preload`, say ready, then fork one child per request until the parent hangs up."""
    import gc
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent and the task, not us
    for name in preload:
        with suppress(Exception):  # the task imports it again and reports its own error
            importlib.import_module(name)
    gc.freeze()  # the children's collections skip the shared heap: fewer copy-on-write pages
    sock.sendall(READY)
    while True:
        request, fds = _receive(sock)
        if request is None:
            return  # the parent closed its end or died
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(request, fds[0])  # never returns
        for fd in fds:
            os.close(fd)
        sock.sendall(HEADER.pack(pid))
        _, status = os.waitpid(pid, 0)
        sock.sendall(HEADER.pack(os.waitstatus_to_exitcode(status) & 0xFFFFFFFF))


def _receive(sock: socket.socket) -> tuple[dict | None, list[int]]:
    head, fds, _, _ = socket.recv_fds(sock, HEADER.size, 1)
    if not head:
        return None, []
    head += _exactly(sock, HEADER.size - len(head))
    (size,) = HEADER.unpack(head)
    return json.loads(_exactly(sock, size)), fds


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed mid-message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _child(request: dict, out_fd: int) -> None:
    """Become the task: what `sh -c 'python3 -m kfp.dsl.executor_main ...'` would have run."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        os.close(null)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        if "numpy.random" in sys.modules:  # a fresh process seeds numpy's global generator from the OS
            sys.modules["numpy.random"].seed()  # (`random` reseeds itself after a fork)
        code = _run_executor(request["source"], request["args"])
    except BaseException:  # a failure here is the task's failure, with its traceback
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _run_executor(source: str, args: list[str]) -> int:
    import runpy
    import shutil
    import tempfile
    import traceback

    directory = tempfile.mkdtemp()
    module = os.path.join(directory, "ephemeral_component.py")
    with open(module, "w", encoding="utf-8", newline="") as handle:
        handle.write(source)  # printf "%s" "$0" > "$program_path/ephemeral_component.py"
    sys.argv = ["-m", "--component_module_path", module, *args]
    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
    code = 0
    try:
        runpy.run_module("kfp.dsl.executor_main", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException:  # the interpreter's own: traceback on stderr, status 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()  # what the interpreter runs at exit (logging.shutdown, MLflow, ours)
    shutil.rmtree(directory, ignore_errors=True)
    return code


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# -- the caller's side -----------------------------------------------------------------------------

def parse_command(full_command: list[str]) -> tuple[str, list[str]] | None:
    """(component source, executor arguments) from kfp's lightweight-component command, or None
    for a command of any other shape (kfp.dsl.component_factory, kfp 2.17.0)."""
    if (len(full_command) >= 4 and full_command[:2] == ["sh", "-ec"]
            and "-m kfp.dsl.executor_main" in full_command[2] and "ephemeral_component.py" in full_command[2]):
        return full_command[3], list(full_command[4:])
    return None


class Zygote:
    """One zygote process and the socket to it; tasks go through it one at a time."""

    def __init__(self, preload: tuple[str, ...] = PRELOAD) -> None:
        ours, theirs = socket.socketpair()
        self.env = dict(os.environ)
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import socket, sys; from pipelines.task_zygote import serve; "
             "serve(socket.socket(fileno=int(sys.argv[1])), sys.argv[2:])", str(theirs.fileno()), *preload],
            pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, env={**self.env, "_KFP_RUNTIME": "true"})  # kfp imports as in a task
        theirs.close()
        self.sock = ours
        self.ready = False
        self.lock = threading.Lock()
        self.forked = 0

    def usable(self) -> bool:
        """Ready (checked without waiting), alive, and started with the caller's environment."""
        if self.process.poll() is not None or not self.same_environment():
            return False
        if not self.ready:
            readable, _, _ = select.select([self.sock], [], [], 0)
            self.ready = bool(readable) and self.sock.recv(1) == READY
        return self.ready

    def run(self, source: str, args: list[str], env_vars: dict | None) -> int:
        """Run one task in a forked child: its output printed here as kfp prints it, its exit
        status returned."""
        env = {**os.environ, **(env_vars or {}), "_KFP_RUNTIME": "true"}
        request = json.dumps({"source": source, "args": args, "env": env, "cwd": os.getcwd()}).encode()
        read_fd, write_fd = os.pipe()
        try:
            socket.send_fds(self.sock, [HEADER.pack(len(request))], [write_fd])
            self.sock.sendall(request)
            (pid,) = HEADER.unpack(_exactly(self.sock, HEADER.size))
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
            (code,) = HEADER.unpack(_exactly(self.sock, HEADER.size))
        except BaseException:
            _kill(pid)
            self.close()  # the reply stream is mid-message: this zygote is done
            raise
        return code - (1 << 32) if code >= 1 << 31 else code

    def same_environment(self) -> bool:
        return _comparable(os.environ) == _comparable(self.env)

    def close(self) -> None:
        self.ready = False
        self.sock.close()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _kill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def _comparable(env) -> dict:
    # pytest rewrites PYTEST_CURRENT_TEST at every test phase; nothing reads it at import
    return {k: v for k, v in env.items() if k != "PYTEST_CURRENT_TEST"}


_zygote: Zygote | None = None
_guard = threading.Lock()


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


@contextmanager
def forked_tasks(zygote: Zygote | None = None):
    """While inside, kfp.local's SubprocessRunner tasks are forked from the zygote (this
    process's shared one by default) when it can serve them, and started by kfp as usual when it cannot."""
    from kfp.local import subprocess_task_handler as handler

    original = handler.run_local_subprocess
    zygote = zygote or shared()

    def run_local_subprocess(full_command, env_vars=None):
        parsed = parse_command(full_command)
        if zygote is None or parsed is None or not zygote.lock.acquire(blocking=False):
            return original(full_command=full_command, env_vars=env_vars)
        try:
            if not zygote.usable():
                return original(full_command=full_command, env_vars=env_vars)
            return zygote.run(*parsed, env_vars)
        finally:
            zygote.lock.release()

    handler.run_local_subprocess = run_local_subprocess
    try:
        yield zygote
    finally:
        handler.run_local_subprocess = original
