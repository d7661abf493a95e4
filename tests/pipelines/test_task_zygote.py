"""Tasks forked from the zygote behave as kfp.local's own task processes: same command, output,
environment, working directory, exit status and atexit handlers; anything the zygote cannot serve
exactly runs as kfp starts it."""
import os
import subprocess
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
    container = component.component_spec.implementation.container
    return [*container.command, *container.args]


def test_the_command_kfp_builds_for_a_python_component_is_recognised():
    source, args = parse_command(kfp_command(shout))
    assert "def shout(word: str) -> str:" in source and source.lstrip().startswith("import kfp")
    assert args == ["--executor_input", "{{$}}", "--function_to_execute", "shout"]
    assert parse_command(["python3", "-m", "kfp.dsl.executor_main"]) is None
    assert parse_command(["sh", "-c", "echo hi"]) is None


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


@pytest.mark.parametrize("source, status, shown", [
    ("print('done')\nraise SystemExit(0)", 0, "done"),
    ("1/0", 1, "ZeroDivisionError"),
    ("raise SystemExit('bad input')", 1, "bad input"),
    ("pass", 1, "has no attribute 'f'"),  # the executor's own error: no such function
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", -9, ""),
])
def test_exit_statuses_are_the_interpreters(zygote, capsys, source, status, shown):
    ready(zygote)
    code = zygote.run(source + "\n", ["--executor_input", "{}", "--function_to_execute", "f"], None)
    assert code == status
    assert shown in capsys.readouterr().out


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
    draws = [line for line in capsys.readouterr().out.splitlines() if line.startswith("draws")]
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
        monkeypatch.setenv("FLYWHEEL_ZYGOTE_TEST", "new")
        second = task_zygote.shared()
        assert second is not first and first.process.poll() is not None
        second.close()
    finally:
        first.close()


@pytest.mark.slow
def test_every_preloaded_module_imports_as_a_task_imports_it():
    """A misspelt or broken entry would only cost time silently: the zygote skips what fails."""
    env = {**os.environ, "_KFP_RUNTIME": "true"}
    program = "import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)"
    done = subprocess.run([sys.executable, "-c", program, *PRELOAD], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
