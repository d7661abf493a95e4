"""Tasks forked from the zygote behave as kfp.local's own task processes: same command, output,
environment, working directory, exit status, threads joined and atexit handlers run (checked side
by side with kfp's launcher); anything the zygote cannot serve exactly runs as kfp starts it."""
import os
import sys
import textwrap
import time

import pytest
from kfp import dsl, local

from pipelines import task_zygote
from pipelines.task_zygote import PRELOAD, Zygote, forked_tasks, parse_command

LIGHT = ("kfp.dsl.executor_main",)  # the tests' zygote: ready in a fraction of a second


def ready(zygote: Zygote, timeout: float = 60) -> Zygote:
    deadline = time.monotonic() + timeout
    while not zygote.usable():
        assert time.monotonic() < deadline, "the zygote never said ready"
        time.sleep(0.05)
    return zygote


@pytest.fixture
def zygote():
    z = Zygote(LIGHT)
    yield z
    z.close()


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def shout(word: str) -> str:
    import os

    print(f"shouting {word} from {os.getpid()}")
    return f"{word.upper()}{os.environ.get('FLYWHEEL_ZYGOTE_TEST', '')}"


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def refuse(word: str) -> str:
    raise ValueError(f"no {word} today")


@dsl.pipeline
def chain(word: str) -> str:
    return shout(word=shout(word=word).output).output


@dsl.pipeline
def refusing(word: str) -> str:
    return refuse(word=word).output


def kfp_command(component) -> list[str]:
    """The command kfp.local runs for `component`: its `python3` replaced by this interpreter."""
    from kfp.local.subprocess_task_handler import replace_python_executable

    container = component.component_spec.implementation.container
    return replace_python_executable([*container.command, *container.args], sys.executable)


def command_for(source: str, args: list[str]) -> list[str]:
    return [*kfp_command(shout)[:3], source, *args]


def test_the_command_kfp_builds_for_a_python_component_is_recognised():
    source, args = parse_command(kfp_command(shout))
    assert "def shout(word: str) -> str:" in source and source.lstrip().startswith("import kfp")
    assert args == ["--executor_input", "{{$}}", "--function_to_execute", "shout"]
    assert parse_command(["python3", "-m", "kfp.dsl.executor_main"]) is None
    assert parse_command(["sh", "-c", "echo hi"]) is None
    sh, flags, script, *rest = kfp_command(shout)
    assert parse_command([sh, flags, "pip install something\n" + script, *rest]) is None, "a step more: not ours"


SOURCES = {
    "prints, then SystemExit(0)": "import sys\nprint('out')\nprint('err', file=sys.stderr)\nraise SystemExit(0)",
    "an exception": "1/0",
    "SystemExit with a message": "raise SystemExit('bad input')",
    "SystemExit(3)": "raise SystemExit(3)",
    "no such function (the executor's error)": "x = 1",
    "a non-daemon thread, then atexit": textwrap.dedent("""
        import atexit, threading, time
        atexit.register(lambda: print("atexit handler ran", flush=True))
        def late():
            time.sleep(0.3)
            print("thread finished", flush=True)
        threading.Thread(target=late).start()
        raise SystemExit(0)
    """),
    "killed by a signal": "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_a_forked_task_ends_as_kfps_own_process_does(zygote, capsys, name):
    """The same source through kfp's launcher and through the zygote: status and output agree."""
    from kfp.local.subprocess_task_handler import run_local_subprocess

    args = ["--executor_input", "{}", "--function_to_execute", "f"]
    expected = run_local_subprocess(command_for(SOURCES[name] + "\n", args))
    theirs = capsys.readouterr().out
    got = ready(zygote).run(SOURCES[name] + "\n", args, None)
    ours = capsys.readouterr().out

    def lines(out):  # tracebacks name the temp module and its folder: keep the last line of each;
        # "Killed" is kfp's `sh` reporting its child's signal, not the task's output. Dedented: kfp.local
        # indents `print` by swapping builtins.print, and a pipeline run in another test's thread can
        # leave it swapped in this process (kfp/local/logging_utils.py indented_print)
        kept = [line for line in textwrap.dedent(out).splitlines()
                if line.strip() and line != "Killed" and not line.startswith(("task process", " "))]
        return sorted(line for line in kept if "ephemeral_component.py" not in line and "tmp" not in line)

    assert got == expected
    assert lines(ours) == lines(theirs)
    assert lines(theirs) or name in ("killed by a signal", "SystemExit(3)"), "something to compare"


def test_a_forked_task_gets_the_callers_environment_directory_output_and_exit_status(zygote, tmp_path,
                                                                                     monkeypatch, capsys):
    source = textwrap.dedent("""
        import atexit, os, sys
        atexit.register(lambda: print("atexit handler ran", flush=True))
        print("cwd", os.getcwd())
        print("env", os.environ.get("FLYWHEEL_ZYGOTE_TEST"), os.environ.get("EXTRA"), os.environ["_KFP_RUNTIME"])
        print("argv", sys.argv[1:3] == ["--component_module_path", __file__])
        print("to stderr", file=sys.stderr)
        sys.exit(3)
    """)
    monkeypatch.chdir(tmp_path)
    ready(zygote)
    code = zygote.run(source, ["--executor_input", "{}", "--function_to_execute", "f"], {"EXTRA": "x"})
    out = capsys.readouterr().out
    assert code == 3
    assert f"cwd {tmp_path}" in out
    assert "env None x true" in out
    assert "argv True" in out and "to stderr" in out and "atexit handler ran" in out
    assert zygote.forked == 1


def test_a_pipeline_runs_its_tasks_forked_with_kfp_local(zygote, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLYWHEEL_ZYGOTE_TEST", "!")
    zygote.close()
    zygote = ready(Zygote(LIGHT))  # started in this environment
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    with forked_tasks(zygote):
        task = chain(word="hi")
    assert task.output == "HI!!"
    assert zygote.forked == 2
    out = capsys.readouterr().out
    pids = {line.split()[-1] for line in out.splitlines() if line.strip().startswith("shouting")}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    zygote.close()


def test_a_failing_task_fails_the_run_with_its_error(zygote, tmp_path, capsys):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    with forked_tasks(ready(zygote)), pytest.raises(RuntimeError, match="refuse"):
        refusing(word="cake")
    assert zygote.forked == 1
    assert "ValueError: no cake today" in capsys.readouterr().out


def test_what_the_zygote_cannot_serve_exactly_runs_as_kfp_starts_it(zygote, tmp_path, monkeypatch):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    ready(zygote)
    monkeypatch.setenv("FLYWHEEL_ZYGOTE_TEST", "?")  # a library may have read the old value at import
    with forked_tasks(zygote):
        assert chain(word="a").output == "A??"
    assert zygote.forked == 0
    monkeypatch.delenv("FLYWHEEL_ZYGOTE_TEST")
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "another test (call)")  # pytest's own; never read at import
    assert zygote.usable()
    zygote.process.kill()
    zygote.process.wait()
    assert not zygote.usable()
    with forked_tasks(zygote):
        assert chain(word="b").output == "B"
    assert zygote.forked == 0


def test_each_task_draws_its_own_random_numbers_as_a_fresh_process_does(capsys):
    zygote = ready(Zygote((*LIGHT, "numpy.random")))  # its global generator made in the zygote
    try:
        source = "import random, numpy\nprint('draws', random.random(), numpy.random.random())\nraise SystemExit(0)\n"
        for _ in range(2):
            assert zygote.run(source, ["--function_to_execute", "f"], None) == 0
    finally:
        zygote.close()
    out = capsys.readouterr().out
    draws = [line.strip() for line in out.splitlines() if line.strip().startswith("draws")]
    assert len(draws) == 2, out
    first, second = (line.split()[1:] for line in draws)
    assert first[0] != second[0] and first[1] != second[1]


def test_a_zygote_that_died_says_so_in_one_line(zygote):
    ready(zygote)
    zygote.process.kill()
    zygote.process.wait()
    with pytest.raises(RuntimeError, match="task zygote died.*FLYWHEEL_TASK_ZYGOTE=0"):
        zygote.run("pass\n", ["--executor_input", "{}", "--function_to_execute", "f"], None)


def test_the_shared_zygote_is_off_when_asked_and_restarted_when_the_environment_changes(monkeypatch):
    monkeypatch.setattr(task_zygote, "_zygote", None)
    monkeypatch.setattr(task_zygote, "PRELOAD", LIGHT)
    monkeypatch.setenv("FLYWHEEL_TASK_ZYGOTE", "0")
    assert task_zygote.shared() is None
    monkeypatch.delenv("FLYWHEEL_TASK_ZYGOTE")
    first = task_zygote.shared()
    try:
        assert task_zygote.shared() is first
        with forked_tasks() as default:  # the shared one, taken while the context holds its lock
            assert default is first
        monkeypatch.setenv("FLYWHEEL_ZYGOTE_TEST", "new")
        second = task_zygote.shared()
        assert second is not first and first.process.poll() is not None
        second.close()
    finally:
        first.close()


def test_a_task_that_sets_a_variable_to_another_value_runs_as_kfp_starts_it(zygote, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    z = ready(Zygote(LIGHT))
    try:
        assert z.usable({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}), "the zygote's own value: forked"
        assert not z.usable({"AWS_ENDPOINT_URL": "http://minio:9000"}), "a library may read it at import"
    finally:
        z.close()


def test_the_zygote_dying_mid_task_fails_the_task_in_one_line(zygote):
    import threading

    ready(zygote)
    threading.Timer(0.5, zygote.process.kill).start()
    with pytest.raises(RuntimeError, match=r"task zygote died while task process \d+ ran"):
        zygote.run("import time\ntime.sleep(1.5)\n", ["--executor_input", "{}", "--function_to_execute", "f"], None)


def test_closing_a_zygote_that_is_still_importing_is_immediate(tmp_path, monkeypatch):
    (tmp_path / "slow_to_import.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    z = Zygote(("slow_to_import",))
    time.sleep(0.5)
    began = time.monotonic()
    z.close()
    assert time.monotonic() - began < 2 and z.process.poll() is not None


def test_nested_contexts_put_kfps_launcher_back_when_the_last_closes(zygote):
    from kfp.local import subprocess_task_handler as handler

    original = handler.run_local_subprocess
    first, second = forked_tasks(zygote), forked_tasks(zygote)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert handler.run_local_subprocess is not original, "one context still open"
    second.__exit__(None, None, None)
    assert handler.run_local_subprocess is original


@pytest.mark.slow
def test_a_zygote_whose_imports_started_torchs_threads_never_forks_a_task(tmp_path, monkeypatch):
    """A forked child's next parallel op would hang (GNU OpenMP's pool is half-gone after a fork):
    the zygote's probe finds it and the zygote never says ready, so tasks run as kfp starts them."""
    (tmp_path / "computes_at_import.py").write_text("import torch\na = torch.ones(2000, 2000)\n(a @ a).sum()\n")
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # a pool of one thread has no worker to lose (tests run with 1)
    z = Zygote(("torch", "computes_at_import"), probe_seconds=5)
    try:
        z.process.wait(timeout=120)
        assert not z.usable()
    finally:
        z.close()


@pytest.mark.slow
def test_the_real_zygote_imports_every_preload_and_its_tasks_use_torchs_threads(capsys, monkeypatch):
    """A misspelt or broken PRELOAD entry would only cost time silently (the zygote skips what
    fails): each is in the forked task's modules, and a parallel torch op there finishes."""
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the tests run with 1: a pool with workers to lose
    z = ready(Zygote(PRELOAD), timeout=180)
    source = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(2)
        a = torch.ones(1500, 1500)
        # kfp.dsl.executor_main runs as __main__ (its own module entry is dropped, as under `-m`)
        missing = [m for m in {PRELOAD!r} if m not in sys.modules and m != "kfp.dsl.executor_main"]
        print("sum", round(float((a @ a).sum()) / 1e9, 2), "missing", missing)
        raise SystemExit(0)
    """)
    try:
        code = z.run(source, ["--executor_input", "{}", "--function_to_execute", "f"], None)
    finally:
        z.close()
    assert code == 0
    assert "sum 3.37 missing []" in capsys.readouterr().out  # 1500 ** 3 / 1e9, in float32
