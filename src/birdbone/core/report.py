"""The run at a glance: baseline, every decay wave, the final model of each later stage and
the exported file, one row each (in-domain perplexity; perplexity, KL and top-1 agreement
with dense on the general split; sparsity, parameters, bytes, speed), from
the reports a run leaves in ``data/08_reporting``. ``birdbone report`` prints it and writes
``report.md`` and ``report.png`` beside them. No Kedro here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from birdbone.errors import BirdboneError

REPORTS = Path("data/08_reporting")


class ReportError(BirdboneError):
    """There is no run to report on."""


GENERAL = ("ppl_general", "kl_general", "top1_general")


def _general(section: dict[str, Any]) -> dict[str, Any]:
    return {key: section.get(key) for key in GENERAL}


def gguf_export(summary: dict[str, Any]) -> dict[str, Any]:
    """The GGUF file among ``summary``'s exports (empty when the run exported none)."""
    return next((e for e in summary.get("exports") or [] if e.get("format") == "gguf"), {})


def rows(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per stage of the run ``summary`` (``summary.json``) describes."""
    base = summary.get("baseline") or {}
    out = [
        {
            "stage": "baseline",
            "ppl_val": base.get("ppl_val"),
            "ppl_test": base.get("ppl_test"),
            "kl": 0.0,
            **(
                {"ppl_general": base["ppl_general"], "kl_general": 0.0, "top1_general": 1.0}
                if base.get("ppl_general") is not None
                else {}
            ),
            "sparsity": 0.0,
            "params": base.get("params"),
            "bytes": base.get("bytes"),
            "torch_tok_s": base.get("tokens_per_s"),
        }
    ]
    for wave in summary.get("waves") or []:
        if wave.get("index", 0) == 0 or wave.get("decision") == "skipped":
            continue
        out.append(
            {
                "stage": f"wave {wave['index']} ({wave.get('decision', '?')})",
                "ppl_val": wave.get("ppl"),
                "kl": wave.get("kl"),
                **_general(wave),
                "sparsity": wave.get("sparsity"),
            }
        )
    final = summary.get("final")
    if final:
        out.append(
            {
                "stage": "decayed",
                "ppl_test": final.get("ppl_test"),
                **_general(final),
                "sparsity": final.get("sparsity"),
                "params": final.get("params"),
                "bytes": final.get("bytes"),
            }
        )
    heal = (summary.get("heal") or {}).get("final")
    if heal:
        shapes = {k: (final or {}).get(k) for k in ("sparsity", "params", "bytes")}  # healing changes no shape
        out.append(
            {"stage": "healed", "ppl_val": heal.get("ppl_val"), "ppl_test": heal.get("ppl_test"), **_general(heal)}
            | shapes
        )
    quant = summary.get("quantize")
    if quant:
        out.append(
            {
                "stage": f"quantized ({quant.get('method')}, {quant.get('avg_bits', 0):.2f} bits)",
                "ppl_val": quant.get("ppl_val"),
                "ppl_test": quant.get("ppl_test"),
                **_general(quant),
                "params": (final or {}).get("params"),
                "bytes": quant.get("bytes"),  # at its grids, as a GGUF stores them
            }
        )
    gguf = gguf_export(summary)
    if gguf:
        speed = summary.get("speed") or {}
        verified = summary.get("exports_verified") or {}
        out.append(
            {
                "stage": "export (llama.cpp)",
                "ppl_test": verified.get("ppl_llama_cpp"),
                **_general(verified),
                "bytes": gguf.get("bytes"),
                "llamacpp_tok_s": speed.get("decode_tokens_per_s"),
                "decode_x_dense": speed.get("decode_x_dense_f16"),
            }
        )
    return out


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "ppl":
        return f"{value:.3f}"
    if kind == "share":
        return f"{100 * value:.1f} %"
    if kind == "kl":
        return f"{value:.4f}"
    if kind == "int":
        return f"{int(value):,}"
    if kind == "mb":
        return f"{value / 1e6:.1f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "top1":
        return f"{value:.3f}"
    return f"{value:.1f}"


COLUMNS = [
    ("stage", "stage", "text"),
    ("ppl_val", "val ppl", "ppl"),
    ("ppl_test", "test ppl", "ppl"),
    ("kl", "val KL", "kl"),
    ("ppl_general", "general ppl", "ppl"),
    ("kl_general", "general KL", "kl"),
    ("top1_general", "top-1 = dense", "top1"),
    ("sparsity", "sparsity", "share"),
    ("params", "params", "int"),
    ("bytes", "MB", "mb"),
    ("torch_tok_s", "torch decode tok/s", "float"),
    ("llamacpp_tok_s", "llama.cpp decode tok/s", "float"),
    ("decode_x_dense", "llama.cpp x dense F16", "x"),
]


SIZES = (
    "MB: the model as its folder stores it (baseline, decayed, healed: float weights), the quantized model "
    "at its grids (as a GGUF stores them, scales included), the exported file. Speed: torch on the baseline "
    "(this machine), llama.cpp on the export and on dense F16 in the same run (the ratio is the comparable one)."
)


def table(report_rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
    for row in report_rows:
        cells = [str(row.get(key) or "") if kind == "text" else _cell(row.get(key), kind) for key, _, kind in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def timeline_line(summary: dict[str, Any]) -> str:
    """Where the last run's time went, by stage (``summary.json``'s ``timeline``; each node
    in ``timeline.png``), in one line; empty when the run left none."""
    timeline = summary.get("timeline") or {}
    if not timeline.get("stage_seconds"):
        return ""
    total = max(timeline["total_seconds"], 1e-9)
    stages = timeline["stage_seconds"].items()
    parts = [f"{stage} {seconds:.0f} s ({100 * seconds / total:.0f} %)" for stage, seconds in stages]
    return f"Time of the last run: {', '.join(parts)}; {total / 60:.1f} min in all (per node: timeline.png)."


def _versus(value: float | None, dense: float | None) -> str:
    """``16.04 (dense 15.76, +1.8 %)``; the bare value without a dense figure."""
    if value is None:
        return "not measured"
    if not dense:
        return f"{value:.2f}"
    return f"{value:.2f} (dense {dense:.2f}, {100 * (value / dense - 1):+.1f} %)"


def _size(path: Path) -> int:
    """Bytes of a file, or of the files under a folder (links not followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def wave_line(summary: dict[str, Any]) -> str:
    """The decay's waves in one line: ``wave 1 reverted (general ppl +16.9 % ...), wave 2 kept``."""
    parts = []
    waves = [w for w in summary.get("waves") or [] if w.get("index", 0) > 0]
    skipped = [w for w in waves if w.get("decision") == "skipped"]
    for wave in waves:
        if wave in skipped:
            continue
        reason = str(wave.get("reason") or "")
        reason = f" ({reason[:60]}{'...' if len(reason) > 60 else ''})" if reason and wave["decision"] != "kept" else ""
        parts.append(f"wave {wave['index']} {wave.get('decision', '?')}{reason}")
    if skipped:  # the room left for more waves (or a rollback) that the run did not need
        reason = skipped[0].get("reason")
        parts.append(f"{len(skipped)} more not run" + (f" ({reason})" if reason else ""))
    return ", ".join(parts)


def last_stage(summary: dict[str, Any]) -> tuple[str, dict[str, Any], str]:
    """The run's last measured model: (label, its section of ``summary``, the key of its
    in-domain test perplexity): the export in llama.cpp, else the quantized, healed,
    decayed model in torch, else the baseline."""
    stages = [
        ("export in llama.cpp", summary.get("exports_verified"), "ppl_llama_cpp"),
        ("quantized, torch", summary.get("quantize"), "ppl_test"),
        ("healed, torch", (summary.get("heal") or {}).get("final"), "ppl_test"),
        ("decayed, torch", summary.get("final"), "ppl_test"),
    ]
    return next(((n, s, k) for n, s, k in stages if s), ("baseline, torch", summary.get("baseline") or {}, "ppl_test"))


def closing_lines(summary: dict[str, Any], root: Path, written: list[str], run: dict[str, str] | None) -> list[str]:
    """What a run made and how good it is, for the end of ``kedro run``: the files this run
    wrote (``written``: paths under ``root``, the GGUF first) and their sizes, perplexity
    against dense on the in-domain test split and the general split (the exported GGUF in
    llama.cpp when there is one, else the last stage in torch), llama.cpp's decode speed
    against dense F16, the waves' decisions, and the MLflow run (``run``: ``id``,
    ``experiment_id``, ``uri``) with the command that opens it."""
    lines = []
    for rel in written:
        path = root / rel
        if path.exists():
            lines.append(f"  {rel + ('/' if path.is_dir() else ''):<34} {_size(path) / 1e6:9.1f} MB")
    base = summary.get("baseline") or {}
    speed = summary.get("speed") or {}
    if lines and speed.get("dense_f16_bytes"):
        lines.append(f"  {'(dense F16 GGUF, for comparison)':<34} {speed['dense_f16_bytes'] / 1e6:9.1f} MB")
    label, last, test_key = last_stage(summary)
    if label != "baseline, torch":
        lines.append(f"  in-domain perplexity ({label}): {_versus(last.get(test_key), base.get('ppl_test'))}")
        lines.append(f"  general perplexity   ({label}): {_versus(last.get('ppl_general'), base.get('ppl_general'))}")
    elif base:
        lines.append(
            f"  dense perplexity: in-domain {_versus(base.get('ppl_test'), None)}, "
            f"general {_versus(base.get('ppl_general'), None)}"
        )
    if speed.get("decode_x_dense_f16") is not None:
        lines.append(
            f"  llama.cpp decode: {speed['decode_x_dense_f16']:.2f}x dense F16 "
            f"({speed['decode_tokens_per_s']:.1f} tok/s, {speed.get('threads') or 'default'} threads, same run)"
        )
    waves = wave_line(summary)
    if waves:
        lines.append(f"  waves: {waves}")
    if run:
        lines.append(
            f"  MLflow run {run['id']}: mlflow ui --backend-store-uri {run['uri']}, then "
            f"http://127.0.0.1:5000/#/experiments/{run['experiment_id']}/runs/{run['id']}"
        )
    lines.append("  all stages in a table: birdbone report")
    return lines


def headline_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The run's headline numbers, flat (``metrics.json``: what ``dvc metrics show`` and
    ``dvc metrics diff`` print): dense and final perplexity in-domain and general and their
    change, llama.cpp decode against dense F16, the GGUF's size, sparsity, bits, the waves
    kept and undone, the run's seconds."""
    base = summary.get("baseline") or {}
    label, last, test_key = last_stage(summary)
    measured = label != "baseline, torch"
    out: dict[str, Any] = {
        "dense.ppl_in_domain": base.get("ppl_test"),
        "dense.ppl_general": base.get("ppl_general"),
        "final.ppl_in_domain": last.get(test_key) if measured else None,
        "final.ppl_general": last.get("ppl_general") if measured else None,
    }
    for kind in ("in_domain", "general"):
        final, dense = out[f"final.ppl_{kind}"], out[f"dense.ppl_{kind}"]
        out[f"final.ppl_{kind}_change"] = final / dense - 1 if final and dense else None
    gguf = gguf_export(summary)
    speed, decay, quant = summary.get("speed") or {}, summary.get("final") or {}, summary.get("quantize") or {}
    waves = [w for w in summary.get("waves") or [] if w.get("index", 0) > 0 and w.get("decision") != "skipped"]
    out |= {
        "export.decode_x_dense_f16": speed.get("decode_x_dense_f16"),
        "export.gguf_mb": gguf["bytes"] / 1e6 if gguf.get("bytes") else None,
        "decay.sparsity": decay.get("sparsity"),
        "quantize.avg_bits": quant.get("avg_bits"),
        "waves.kept": sum(w.get("decision") == "kept" for w in waves) if waves else None,
        "waves.undone": sum(w.get("decision") != "kept" for w in waves) if waves else None,
        "run.seconds": (summary.get("timeline") or {}).get("total_seconds"),
    }
    return {k: round(float(v), 6) for k, v in out.items() if v is not None}


WAVE_COLUMNS = ("wave", "target_sparsity", "sparsity", "ppl", "kl", "ppl_general", "kl_general", "top1_general")


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if r.get(k) is None else r[k] for k in columns} for r in rows)
    return text.getvalue()


def write_views(root: Path, summary: dict[str, Any] | None = None) -> list[Path]:
    """The run's figures in the forms DVC reads, from ``summary.json`` and ``heal.json``:
    ``metrics.json`` (``headline_metrics``), ``waves.csv`` (a row per wave the gate judged,
    with its decision) and ``heal.csv`` (the final heal's loss by step), for ``dvc metrics
    show/diff`` and ``dvc plots show/diff`` (``summary``: ``summary.json`` already read).
    Returns the files written (atomically)."""
    from birdbone.core.io import write_bytes_atomic, write_json_atomic

    reports = root / REPORTS
    if summary is None:
        try:
            summary = json.loads((reports / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
    if not isinstance(summary, dict):
        return []
    written = [reports / "metrics.json"]
    write_json_atomic(written[0], headline_metrics(summary))
    waves = [{**w, "wave": w.get("index")} for w in summary.get("waves") or [] if w.get("decision") != "skipped"]
    try:
        curve = json.loads((reports / "heal.json").read_text(encoding="utf-8"))["final"]["curve"]
    except (OSError, ValueError, KeyError, TypeError):
        curve = []
    points = [p for p in curve if isinstance(p, dict) and "loss" in p]
    # both always written (a header alone without waves or a final heal): they are DVC outputs
    views = (("waves.csv", waves, (*WAVE_COLUMNS, "decision")), ("heal.csv", points, ("step", "loss")))
    for name, table_rows, columns in views:
        written.append(reports / name)
        write_bytes_atomic(written[-1], _csv(table_rows, columns).encode())
    return written


def _series(report_rows: list[dict[str, Any]], key: str) -> list[float]:
    """``key`` of every row, NaN where a row has none: the line breaks there instead of
    drawing straight across stages that were not measured so."""
    return [float("nan") if r.get(key) is None else r[key] for r in report_rows]


def figure(report_rows: list[dict[str, Any]], title: str) -> Any:
    """Perplexity by stage (validation and test; general on its own axis), each with the
    dense model's as a dashed line, and sparsity by stage."""
    import matplotlib.pyplot as plt

    fig, (ppl_ax, sparsity_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = list(range(len(report_rows)))
    labels = [r["stage"] for r in report_rows]
    dense = report_rows[0] if report_rows and report_rows[0]["stage"] == "baseline" else {}
    for key, marker, color in (("ppl_val", "o", "tab:blue"), ("ppl_test", "s", "tab:orange")):
        values = _series(report_rows, key)
        if any(v == v for v in values):  # not all NaN
            ppl_ax.plot(x, values, marker=marker, color=color, label=key.replace("ppl_", ""))
            if dense.get(key) is not None:
                ppl_ax.axhline(dense[key], color=color, ls="--", lw=0.8, alpha=0.7, label=f"dense {key[4:]}")
    ppl_ax.set(title="perplexity by stage (dashed: dense)", ylabel="in-domain perplexity")
    handles, names = ppl_ax.get_legend_handles_labels()
    general = _series(report_rows, "ppl_general")
    if any(v == v for v in general):
        general_ax = ppl_ax.twinx()
        (line,) = general_ax.plot(x, general, marker="^", color="tab:purple", label="general")
        handles, names = [*handles, line], [*names, "general"]
        if dense.get("ppl_general") is not None:
            ref = general_ax.axhline(dense["ppl_general"], color="tab:purple", ls="--", lw=0.8, alpha=0.7)
            handles, names = [*handles, ref], [*names, "dense general"]
        general_ax.set_ylabel("general perplexity (text no stage trained on)")
    ppl_ax.legend(handles, names, fontsize=7)
    sparsity = [100 * v for v in _series(report_rows, "sparsity")]
    if any(v == v for v in sparsity):
        sparsity_ax.plot(x, sparsity, marker="o", color="tab:red")
    sparsity_ax.set(title="sparsity by stage", ylabel="% of block weights removed")
    for ax in (ppl_ax, sparsity_ax):
        ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_report(root: Path) -> tuple[str, Path, Path]:
    """Reads ``data/08_reporting/summary.json`` under ``root``, writes ``report.md`` and
    ``report.png`` beside it (atomically) and returns the table and both paths."""
    from birdbone.core.io import write_bytes_atomic
    from birdbone.core.plots import png_bytes

    path = root / REPORTS / "summary.json"
    if not path.is_file():
        raise ReportError(f"no run to report on: {path} does not exist. Fix: kedro run (or dvc repro) first.")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise ReportError(
            f"{path} is not readable JSON ({exc}): a run was cut short while writing it, or it was edited. "
            "Fix: rerun the last stage (kedro run resumes; dvc repro), which writes it again."
        ) from None
    if not isinstance(summary, dict) or not all(
        isinstance(v, dict | list | str | int | float | None) for v in summary.values()
    ):
        raise ReportError(
            f"{path} holds a JSON {type(summary).__name__}, not the object of sections a run writes. "
            "Fix: rerun the last stage (kedro run resumes; dvc repro), which writes it again."
        )
    report_rows = rows(summary)
    name = (summary.get("model") or {}).get("name", "model")
    text = table(report_rows) + "\n\n" + SIZES
    timing = timeline_line(summary)
    if timing:
        text += f"\n\n{timing}"
    md, png = root / REPORTS / "report.md", root / REPORTS / "report.png"
    write_bytes_atomic(
        md, f"# bird-bone run: {name}\n\nRecipe {summary.get('recipe_hash', '?')[:12]}\n\n{text}\n".encode()
    )
    write_bytes_atomic(png, png_bytes(figure(report_rows, f"bird-bone run: {name}")))
    return text, md, png
