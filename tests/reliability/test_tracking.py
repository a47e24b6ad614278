"""MLflow unavailable or locked: the compression completes, and the tracking failure is
reported once (an ERROR line naming what failed), not dropped and not repeated per metric."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import finish, kedro, make_project, run_in_process

FAILED = "MLflow tracking failed"


@pytest.fixture()
def project(tmp_path, monkeypatch) -> Path:
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    return project


def _completed(project: Path) -> None:
    summary = json.loads((project / "data/08_reporting/summary.json").read_text())
    assert summary["exports_verified"]["passed"] and (project / "models/export/model.gguf").is_file()


def _reports(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and FAILED in r.getMessage()]


def test_a_store_that_cannot_be_created_is_reported_once_and_the_run_completes(project, caplog):
    (project / "not-a-folder").write_text("a file where the store's folder should be")
    with caplog.at_level(logging.ERROR, logger="birdbone"):
        run_in_process(project, tracking={"uri": "sqlite:///not-a-folder/mlflow.db"})
    _completed(project)
    reports = _reports(caplog)
    assert len(reports) == 1, reports
    assert "the run goes on untracked" in reports[0]


def test_a_tracking_server_that_is_down_is_reported_once_and_the_run_completes(project, caplog):
    start = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="birdbone"):
        run_in_process(project, tracking={"uri": "http://127.0.0.1:9"})  # nothing listens on port 9
    _completed(project)
    reports = _reports(caplog)
    assert len(reports) == 1, reports
    assert "127.0.0.1:9" in reports[0] or "Connection" in reports[0], reports[0]
    assert time.monotonic() - start < 120  # a few quick retries, not minutes of them


def test_a_locked_store_is_reported_once_and_the_run_completes(project):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    mlflow.search_experiments()  # creates mlflow.db with its tables
    holder = sqlite3.connect(project / "mlflow.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the store: nobody else reads or writes it
    try:
        log = finish(kedro(project, "--params", "run.resume=false"))
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    _completed(project)
    reports = [line for line in log.splitlines() if FAILED in line]
    assert len(reports) == 1, reports
    assert "locked" in reports[0], reports[0]
