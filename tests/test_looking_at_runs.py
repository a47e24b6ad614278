"""Looking at runs: ``notebooks/healing.ipynb`` runs on the MLflow store of two real runs
(executed with nbclient, so it cannot rot) and is committed without outputs; ``birdbone
report`` tabulates the last run stage by stage."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from birdbone.console import main
from tests.conftest import ROOT
from tests.test_pipeline import run

NOTEBOOK = ROOT / "notebooks/healing.ipynb"


def test_the_notebook_is_committed_without_outputs() -> None:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code)


def test_the_notebook_draws_the_last_and_an_earlier_run_and_report_tabulates_the_last(
    project: Path, monkeypatch, capsys
) -> None:
    run(project)
    run(project, heal={"final": {"steps": 2}})
    monkeypatch.setenv("BIRDBONE_EARLIER_RUN", "2")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(project)}}
    ).execute()
    outputs = [o for c in notebook.cells for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o["output_type"] == "stream")
    assert "last: " in text and "earlier: " in text
    drawn = int(text.split(" healing curves drawn")[0].split()[-1])
    assert drawn == 2 * 5  # each run: 4 waves healed and the final heal
    images = [o for o in outputs if o["output_type"] == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) == 2  # decay waves, healing curves

    assert main(["report"]) == 0
    printed = capsys.readouterr().out
    stages = [line.split(" | ")[0].removeprefix("| ") for line in printed.splitlines() if line.startswith("| ")][2:]
    assert stages[0] == "baseline" and stages[-1] == "export (llama.cpp)"
    assert {"decayed", "healed", "quantized (gptq, 4.50 bits)"} <= set(stages)
    assert any(s.startswith("wave 1 (") for s in stages)
    reports = project / "data/08_reporting"
    assert (reports / "report.png").read_bytes()[:4] == b"\x89PNG"
    assert "| baseline |" in (reports / "report.md").read_text()
    # where the time went: every node of the last run, by stage, in summary.json, the report and a PNG
    summary = json.loads((reports / "summary.json").read_text())
    timeline = summary["timeline"]
    assert {"baseline", "decay", "quantize", "export"} <= set(timeline["stage_seconds"])
    assert set(timeline["nodes"]) >= {"quantize", "export", "heal_final", "wave_1.gate"}
    assert sum(n["seconds"] for n in timeline["nodes"].values()) <= timeline["total_seconds"] + 1
    assert "Time of the last run: baseline " in printed and "min in all" in printed
    assert (reports / "timeline.png").read_bytes()[:4] == b"\x89PNG"
