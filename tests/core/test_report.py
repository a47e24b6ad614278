"""The run's report and the lines a run ends with, from summary.json alone; progress bars
that read well in a log file."""

import logging
from pathlib import Path

import pytest

from birdbone.core import progress
from birdbone.core.report import closing_lines, wave_line

SUMMARY = {
    "baseline": {"ppl_test": 15.0, "ppl_general": 50.0, "bytes": 270_000_000},
    "waves": [
        {"index": 0, "decision": "kept"},
        {"index": 1, "decision": "reverted", "reason": "general ppl +16.9 % past the 10 % limit"},
        {"index": 2, "decision": "kept", "reason": "within limits"},
    ],
    "final": {"ppl_test": 15.5, "ppl_general": 58.0},
    "heal": {"final": {"ppl_test": 15.2, "ppl_general": 54.0}},
    "quantize": {"ppl_test": 15.4, "ppl_general": 55.0},
    "exports": [
        {"format": "safetensors", "path": "models/export/hf"},
        {"format": "gguf", "path": "models/export/model.gguf"},
    ],
    "exports_verified": {"ppl_llama_cpp": 15.45, "ppl_general": 55.2},
    "speed": {"decode_x_dense_f16": 2.21, "decode_tokens_per_s": 112.4, "threads": 2, "dense_f16_bytes": 270_900_000},
}


def test_a_whole_run_ends_with_the_gguf_its_quality_against_dense_speed_waves_and_mlflow(tmp_path: Path) -> None:
    (tmp_path / "models/export/hf").mkdir(parents=True)
    (tmp_path / "models/export/model.gguf").write_bytes(b"x" * 2_500_000)
    (tmp_path / "models/export/hf/model.safetensors").write_bytes(b"x" * 1_000_000)
    run = {"id": "abc123", "experiment_id": "1", "uri": "sqlite:///mlflow.db"}
    lines = closing_lines(SUMMARY, tmp_path, ["models/export/model.gguf", "models/export/hf"], run)
    assert lines[0].split() == ["models/export/model.gguf", "2.5", "MB"]
    assert lines[1].split() == ["models/export/hf/", "1.0", "MB"]
    assert lines[2].split() == ["(dense", "F16", "GGUF,", "for", "comparison)", "270.9", "MB"]
    assert lines[3].strip() == "in-domain perplexity (export in llama.cpp): 15.45 (dense 15.00, +3.0 %)"
    assert lines[4].strip() == "general perplexity   (export in llama.cpp): 55.20 (dense 50.00, +10.4 %)"
    assert lines[5].strip() == "llama.cpp decode: 2.21x dense F16 (112.4 tok/s, 2 threads, same run)"
    assert lines[6].strip() == "waves: wave 1 reverted (general ppl +16.9 % past the 10 % limit), wave 2 kept"
    assert "mlflow ui --backend-store-uri sqlite:///mlflow.db" in lines[7] and lines[7].endswith("/1/runs/abc123")


def test_a_baseline_only_run_ends_with_the_dense_figures_and_no_claims_it_cannot_make(tmp_path: Path) -> None:
    lines = closing_lines({"baseline": SUMMARY["baseline"]}, tmp_path, [], None)
    assert lines[0].strip() == "dense perplexity: in-domain 15.00, general 50.00"
    assert not any("x dense F16" in line or "waves" in line or "MLflow" in line for line in lines)


def test_a_run_that_stopped_after_healing_compares_the_healed_model_in_torch(tmp_path: Path) -> None:
    summary = {k: SUMMARY[k] for k in ("baseline", "waves", "final", "heal")}
    lines = "\n".join(closing_lines(summary, tmp_path, [], None))
    assert "in-domain perplexity (healed, torch): 15.20 (dense 15.00, +1.3 %)" in lines


def test_waves_not_run_are_counted_not_listed() -> None:
    waves = [{"index": 1, "decision": "kept"}] + [
        {"index": k, "decision": "skipped", "reason": "schedule complete"} for k in (2, 3, 4)
    ]
    assert wave_line({"waves": waves}) == "wave 1 kept, 3 more not run (schedule complete)"


def test_long_waves_reasons_are_cut_to_keep_the_line_short() -> None:
    summary = {"waves": [{"index": 1, "decision": "rolled back", "reason": "x" * 200}]}
    assert wave_line(summary) == f"wave 1 rolled back ({'x' * 60}...)"


def test_in_a_log_file_a_bar_is_a_log_line_a_minute_and_short_work_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(progress, "interactive", lambda: False)
    caplog.set_level(logging.INFO, logger="birdbone.progress")
    for _ in progress.bar(range(100), desc="quick", unit="step"):
        pass
    assert not caplog.records  # under a minute: no frames, no half-lines
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    for _ in progress.bar(range(3), desc="heal wave 2", unit="step"):
        pass
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all(line.startswith("heal wave 2: ") and "\r" not in line for line in lines)
    assert lines[-1].startswith("heal wave 2: 3/3 step [")


def test_report_rows_give_every_model_a_size_and_keep_torch_and_llama_cpp_speeds_apart() -> None:
    from birdbone.core.report import COLUMNS, rows, table

    summary = {
        **SUMMARY,
        "baseline": {**SUMMARY["baseline"], "params": 135_000_000, "tokens_per_s": 31.9},
        "final": {**SUMMARY["final"], "params": 120_000_000, "bytes": 480_000_000, "sparsity": 0.1},
        "quantize": {**SUMMARY["quantize"], "method": "gptq", "avg_bits": 4.5, "bytes": 80_000_000},
        "exports": [{"format": "gguf", "path": "models/export/model.gguf", "bytes": 84_000_000}],
    }
    by_stage = {r["stage"].split(" (")[0]: r for r in rows(summary)}
    assert by_stage["healed"]["bytes"] == 480_000_000 and by_stage["healed"]["params"] == 120_000_000
    assert by_stage["quantized"]["bytes"] == 80_000_000
    assert by_stage["baseline"]["torch_tok_s"] == 31.9 and "llamacpp_tok_s" not in by_stage["baseline"]
    export = by_stage["export"]
    assert export["llamacpp_tok_s"] == 112.4 and "torch_tok_s" not in export and export["decode_x_dense"] == 2.21
    titles = [title for _, title, _ in COLUMNS]
    assert "torch decode tok/s" in titles and "llama.cpp decode tok/s" in titles
    assert "| healed | " in table(rows(summary)) and "| 480.0 |" in table(rows(summary))


def test_the_views_for_dvc_are_flat_metrics_and_csv_curves(tmp_path: Path) -> None:
    import csv
    import json

    from birdbone.core.report import write_views

    reports = tmp_path / "data/08_reporting"
    reports.mkdir(parents=True)
    summary = {**SUMMARY, "waves": [{**w, "sparsity": 0.1 * w["index"], "ppl": 15.0} for w in SUMMARY["waves"]]}
    summary["exports"] = [{"format": "gguf", "path": "models/export/model.gguf", "bytes": 84_000_000}]
    (reports / "summary.json").write_text(json.dumps(summary))
    (reports / "heal.json").write_text(
        json.dumps({"final": {"curve": [{"step": 0, "val_ppl": 20}, {"step": 1, "loss": 2.5}]}})
    )
    assert [p.name for p in write_views(tmp_path)] == ["metrics.json", "waves.csv", "heal.csv"]
    metrics = json.loads((reports / "metrics.json").read_text())
    assert all(isinstance(v, float) for v in metrics.values())  # flat: one number per key
    assert metrics["final.ppl_general"] == 55.2 and metrics["final.ppl_general_change"] == pytest.approx(0.104)
    assert metrics["export.decode_x_dense_f16"] == 2.21 and metrics["export.gguf_mb"] == 84.0
    assert (metrics["waves.kept"], metrics["waves.undone"]) == (1.0, 1.0)
    waves = list(csv.DictReader((reports / "waves.csv").open()))
    assert [(w["wave"], w["decision"]) for w in waves] == [("0", "kept"), ("1", "reverted"), ("2", "kept")]
    assert (reports / "heal.csv").read_text() == "step,loss\n1,2.5\n"
    (reports / "heal.json").unlink()  # a recipe without a final heal: the header alone, still a file DVC finds
    write_views(tmp_path)
    assert (reports / "heal.csv").read_text() == "step,loss\n"
