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
            "decode_tok_s": base.get("tokens_per_s"),
            "runtime": "torch",
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
        out.append(
            {"stage": "healed", "ppl_val": heal.get("ppl_val"), "ppl_test": heal.get("ppl_test"), **_general(heal)}
        )
    quant = summary.get("quantize")
    if quant:
        out.append(
            {
                "stage": f"quantized ({quant.get('method')}, {quant.get('avg_bits', 0):.2f} bits)",
                "ppl_val": quant.get("ppl_val"),
                "ppl_test": quant.get("ppl_test"),
                **_general(quant),
            }
        )
    gguf = next((e for e in summary.get("exports") or [] if e.get("format") == "gguf"), None)
    if gguf:
        speed = summary.get("speed") or {}
        verified = summary.get("exports_verified") or {}
        out.append(
            {
                "stage": "export (llama.cpp)",
                "ppl_test": verified.get("ppl_llama_cpp"),
                **_general(verified),
                "bytes": gguf.get("bytes"),
                "decode_tok_s": speed.get("decode_tokens_per_s"),
                "decode_x_dense": speed.get("decode_x_dense_f16"),
                "runtime": "llama.cpp",
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
    ("decode_tok_s", "decode tok/s", "float"),
    ("runtime", "in", "text"),
    ("decode_x_dense", "x dense F16", "x"),
]


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


def figure(report_rows: list[dict[str, Any]], title: str) -> Any:
    """Perplexity by stage (validation and test; general on its own axis) and sparsity by stage."""
    import matplotlib.pyplot as plt

    fig, (ppl_ax, sparsity_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = list(range(len(report_rows)))
    labels = [r["stage"] for r in report_rows]
    for key, marker in (("ppl_val", "o"), ("ppl_test", "s")):
        points = [(i, r[key]) for i, r in zip(x, report_rows, strict=True) if r.get(key) is not None]
        if points:
            ppl_ax.plot(*zip(*points, strict=True), marker=marker, label=key.replace("ppl_", ""))
    ppl_ax.set(title="perplexity by stage", ylabel="in-domain perplexity")
    handles, names = ppl_ax.get_legend_handles_labels()
    points = [(i, r["ppl_general"]) for i, r in zip(x, report_rows, strict=True) if r.get("ppl_general") is not None]
    if points:
        general_ax = ppl_ax.twinx()
        (line,) = general_ax.plot(*zip(*points, strict=True), marker="^", color="tab:purple", label="general")
        general_ax.set_ylabel("general perplexity (text no stage trained on)")
        handles, names = [*handles, line], [*names, "general"]
    ppl_ax.legend(handles, names)
    points = [(i, 100 * r["sparsity"]) for i, r in zip(x, report_rows, strict=True) if r.get("sparsity") is not None]
    if points:
        sparsity_ax.plot(*zip(*points, strict=True), marker="o", color="tab:red")
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
    text = table(report_rows)
    timing = timeline_line(summary)
    if timing:
        text += f"\n\n{timing}"
    md, png = root / REPORTS / "report.md", root / REPORTS / "report.png"
    write_bytes_atomic(
        md, f"# bird-bone run: {name}\n\nRecipe {summary.get('recipe_hash', '?')[:12]}\n\n{text}\n".encode()
    )
    write_bytes_atomic(png, png_bytes(figure(report_rows, f"bird-bone run: {name}")))
    return text, md, png
