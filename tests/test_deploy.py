"""Beyond one machine: ``kedro viz build`` makes the static pipeline page, and the committed
Airflow DAGs in ``pipelines/airflow`` are what ``scripts/airflow_dags.sh`` makes of the
pipelines now (so they cannot go stale), each with its own DAG id."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "KEDRO_DISABLE_TELEMETRY": "true"}


def test_kedro_viz_build_writes_the_pipelines_page(project: Path) -> None:
    done = subprocess.run(["kedro", "viz", "build"], cwd=project, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (project / "build/index.html").is_file()
    pipelines = json.loads((project / "build/api/main").read_text())["pipelines"]
    assert {p["id"] for p in pipelines} >= {"__default__", "baseline", "profile", "decay", "quantize", "export"}


def test_the_committed_airflow_dags_are_current_and_distinct(tmp_path: Path) -> None:
    subprocess.run(
        ["bash", str(ROOT / "scripts/airflow_dags.sh"), str(tmp_path)], env=ENV, check=True, capture_output=True
    )
    fresh = {p.name: p.read_text() for p in tmp_path.glob("*.py")}
    committed = {p.name: p.read_text() for p in (ROOT / "pipelines/airflow").glob("*.py")}
    assert fresh.keys() == committed.keys() and len(fresh) == 6
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"pipelines/airflow is stale ({stale}): run bash scripts/airflow_dags.sh"
    ids = []
    for text in committed.values():
        ast.parse(text)
        ids += [line.split('"')[1] for line in text.splitlines() if line.strip().startswith("dag_id=")]
    assert sorted(ids) == sorted(
        ["birdbone", "birdbone_baseline", "birdbone_profile", "birdbone_decay", "birdbone_quantize", "birdbone_export"]
    )
