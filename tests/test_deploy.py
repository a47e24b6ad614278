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


def test_kedro_viz_draws_the_waves_of_the_env_it_is_given(project: Path) -> None:
    """kedro-viz runs no hooks by default; the config loader it makes still sizes the decay."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from kedro.framework.startup import bootstrap_project\n"
        "from kedro_viz.integrations.kedro.data_loader import load_data\n"
        "bootstrap_project(Path.cwd())\n"
        "pipelines = load_data(Path.cwd(), sys.argv[1])[1]\n"
        "print('waves', len({n.namespace for n in pipelines['decay'].nodes if n.namespace}))\n"
    )
    counts = {}
    for env in ("test", "base"):
        done = subprocess.run([sys.executable, "-c", code, env], cwd=project, env=ENV, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        counts[env] = next(line.split()[1] for line in done.stdout.splitlines() if line.startswith("waves "))
    assert counts == {"test": "8", "base": "3"}  # wave_0 and the env's waves: 7 in test, 2 in base
