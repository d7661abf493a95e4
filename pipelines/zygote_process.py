"""The task zygote's own process (pipelines/task_zygote.py starts and talks to it): import the
tasks' libraries once, prove a forked child can still use torch's thread pools, then fork one
child per task and report its pid and exit status.

A child becomes what kfp.local's command (`sh -ec '... python3 -m kfp.dsl.executor_main ...'`,
kfp/dsl/component_factory.py) would have run: the component's source in a temp directory,
`kfp.dsl.executor_main` with the same arguments, the caller's environment and working directory,
stdout and stderr into the caller's pipe. It ends as an interpreter does, minus the teardown:
non-daemon threads joined, atexit handlers run, stdio flushed, then `os._exit` (as multiprocessing's
children do). Unlike a fresh process it does not flush files left unclosed at exit (no module
teardown), shares the zygote's hash seed and its libraries' warnings filters, and reads /dev/null
on stdin.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time
from contextlib import suppress

HEADER = struct.Struct("!Q")
READY = b"R"


def serve(sock: socket.socket, probe_seconds: float, preload: list[str]) -> None:
    """Import `preload`, say ready if a forked child can still do torch's parallel work, then fork
    one child per request until the parent hangs up."""
    import gc
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the parent and the task, not us
    for name in preload:
        with suppress(Exception):  # the task imports it again and reports its own error
            importlib.import_module(name)
    if not _fork_is_safe(probe_seconds):
        return  # never ready: the caller starts every task as kfp does
    gc.freeze()  # the children's collections skip the shared heap: fewer copy-on-write pages
    sock.sendall(READY)
    while True:
        request, fds = _receive(sock)
        if request is None:
            return  # the parent closed its end or died
        _flush()  # nothing buffered here may reach a task's output
        pid = os.fork()
        if pid == 0:
            sock.close()
            _child(request, fds[0])  # never returns
        for fd in fds:
            os.close(fd)
        sock.sendall(HEADER.pack(pid))
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        sock.sendall(HEADER.pack(code if code >= 0 else 128 - code))  # as kfp's `sh -ec` reports a signal


def _fork_is_safe(seconds: float) -> bool:
    """A child forked now finishes a matrix product and a parallel reduction within `seconds`.

    A thread pool started before a fork is half-gone in the child: GNU OpenMP's, which torch's CPU
    ops use, hangs the child's next parallel op (pytorch/pytorch#17199, #2245, #42444). Importing
    starts none, but a module that computes with torch at import would; then nothing may be forked
    from here."""
    if "torch" not in sys.modules:
        return True
    _flush()
    pid = os.fork()
    if pid == 0:
        torch = sys.modules["torch"]
        a = torch.ones(512, 512)
        ok = float((a @ a).sum()) > 0 and float(torch.ones(4_000_000).sum()) > 0 and len(torch.randperm(1 << 16))
        os._exit(0 if ok else 1)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False


def _flush() -> None:
    with suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()


def _receive(sock: socket.socket) -> tuple[dict | None, list[int]]:
    head, fds, _, _ = socket.recv_fds(sock, HEADER.size, 1)
    if not head:
        return None, []
    head += exactly(sock, HEADER.size - len(head))
    (size,) = HEADER.unpack(head)
    return json.loads(exactly(sock, size)), fds


def exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed mid-message")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _child(request: dict, out_fd: int) -> None:
    """Become the task; exit with its status."""
    code = 1
    try:
        # the caller's Ctrl-C disposition (a parent that ignores SIGINT starts tasks that ignore it)
        signal.signal(signal.SIGINT, signal.SIG_IGN if request["sigint_ignored"] else signal.default_int_handler)
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
            _flush()
        finally:
            os._exit(code)


def _run_executor(source: str, args: list[str]) -> int:
    import atexit
    import runpy
    import shutil
    import tempfile
    import threading
    import traceback

    directory = tempfile.mkdtemp()
    module = os.path.join(directory, "ephemeral_component.py")
    with open(module, "w", encoding="utf-8", newline="") as handle:
        handle.write(source)  # printf "%s" "$0" > "$program_path/ephemeral_component.py"
    sys.argv = ["-m", "--component_module_path", module, *args]
    sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
    sys.modules.pop("kfp.dsl.executor_main", None)  # run as __main__, as `-m` does (runpy warns otherwise)
    code = 0
    try:
        runpy.run_module("kfp.dsl.executor_main", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        code = _exit_code(exit_.code)
    except BaseException:  # the interpreter's own: traceback on stderr, status 1
        traceback.print_exc()
        code = 1
    threading._shutdown()  # what Py_FinalizeEx does first: wait for non-daemon threads
    atexit._run_exitfuncs()  # then the atexit handlers (logging.shutdown, MLflow's, ours)
    shutil.rmtree(directory, ignore_errors=True)
    return code


def _exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


if __name__ == "__main__":
    serve(socket.socket(fileno=int(sys.argv[1])), float(sys.argv[2]), sys.argv[3:])
