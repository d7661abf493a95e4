"""`flywheel score` checks its --data and --out before the pipeline starts: one line, exit 1,
naming the path (the registry lookup is stubbed: a champion exists)."""
import pytest
from typer.testing import CliRunner

import pipelines.cli as cli
import pipelines.cli_app as cli_app
import pipelines.scoring_run as scoring_run
import stages.versions
from pipelines.config import load_settings


@pytest.fixture
def started(tmp_path, monkeypatch):
    """The pipeline runs it would have started (none, when a check refuses the paths)."""
    settings = load_settings("local", overrides={"mlflow": {"tracking_uri": f"sqlite:///{tmp_path / 'm.db'}"}})
    monkeypatch.setattr(cli_app, "load_settings", lambda env: settings)
    monkeypatch.setattr(stages.versions, "version_behind", lambda uri, name, alias: "3")
    runs = []

    def run_scoring(settings, data, out, console, verbose=False):
        runs.append((data, out))
        raise RuntimeError("stopped here")

    monkeypatch.setattr(scoring_run, "run_scoring", run_scoring)
    return runs


def score(data, out):
    return CliRunner().invoke(cli.app, ["score", "--data", str(data), "--out", str(out)])


def last_line(result) -> str:
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "accounts.csv"
    path.write_text("age,income\n30,1000\n")
    return path


def test_a_missing_data_file_fails_before_the_pipeline_starts(tmp_path, started):
    result = score(tmp_path / "nope.csv", tmp_path / "p.parquet")
    assert result.exit_code == 1 and started == []
    assert last_line(result) == f"error: input table not found: {tmp_path / 'nope.csv'}"
    assert len(result.output.strip().splitlines()) == 1


def test_an_out_under_a_file_fails_before_the_pipeline_starts(tmp_path, table, started):
    (tmp_path / "afile").write_text("")
    out = tmp_path / "afile" / "sub" / "p.parquet"
    result = score(table, out)
    assert result.exit_code == 1 and started == []
    assert last_line(result) == f"error: cannot write --out {out}: {tmp_path / 'afile'} is not a directory"


def test_an_unwritable_out_folder_fails_before_the_pipeline_starts(tmp_path, table, started, monkeypatch):
    monkeypatch.setattr(scoring_run.os, "access", lambda path, mode: False)  # root may write anywhere
    result = score(table, tmp_path / "p.parquet")
    assert result.exit_code == 1 and started == []
    assert last_line(result) == (f"error: cannot write --out {tmp_path / 'p.parquet'}: its folder {tmp_path} "
                                 "is not writable")
    out = tmp_path / "new" / "p.parquet"
    result = score(table, out)
    assert last_line(result) == (f"error: cannot write --out {out}: its folder {tmp_path / 'new'} cannot be created "
                                 f"({tmp_path} is not writable)")


def test_an_out_that_is_a_directory_fails_before_the_pipeline_starts(tmp_path, table, started):
    result = score(table, tmp_path)
    assert result.exit_code == 1 and started == []
    assert last_line(result).startswith(f"error: --out {tmp_path} is a directory")


def test_good_paths_start_the_pipeline_and_a_missing_out_folder_is_created_by_it(tmp_path, table, started):
    out = tmp_path / "new" / "deeper" / "p.parquet"
    result = score(table, out)
    assert started == [(str(table), str(out))]
    assert last_line(result) == "error: stopped here"
