"""Pruning quality on the default model: validation perplexity and wall time for each
criterion x pattern, against the dense model in the same run.

    .venv/bin/python bench/prune_quality.py                      # the reported run
    .venv/bin/python bench/prune_quality.py --validation 8 --calibration 16   # quick look

Prints a table, writes JSON (bench/results/prune_quality.json) and a PNG beside it, and
checks the issue's targets: SparseGPT <= Wanda <= magnitude in perplexity at 50 % and at
2:4; Wanda 50 % within +110 % of dense; Wanda (64 x 512 calibration tokens) under 60 s;
SparseGPT under 5 minutes; the same run twice gives the same masks bit for bit.

    .venv/bin/python bench/prune_quality.py --scaffold           # the scaffold study alone

``--scaffold`` compares the seed's scaffold (a low-rank part plus a sparse residual,
``core/prune/scaffold.py``) with Wanda and SparseGPT at the same count of numbers kept
(50 % and 70 % removed), into ``scaffold`` of the same JSON and ``prune_scaffold.png``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from birdbone.config import (
    BlocksPattern,
    DataConfig,
    DefaultModel,
    GradientOptions,
    HeadsPattern,
    MLPChannelsPattern,
    NMPattern,
    OWLOptions,
    SparseGPTOptions,
    SpeedConfig,
    UnstructuredPattern,
)
from birdbone.core import data, evaluate, modeling, plots, speed
from birdbone.core.io import write_bytes_atomic, write_json_atomic
from birdbone.core.prune import prune_
from birdbone.core.prune.structured import prune_structure_

log = logging.getLogger("bench.prune_quality")

PATTERNS = {
    "unstructured": UnstructuredPattern(kind="unstructured", sparsity=0.5),
    "2:4": NMPattern(kind="nm", n=2, m=4),
}
METHODS = ["magnitude", "wanda", "sparsegpt", "gradient"]
OPTIONS = {"sparsegpt": SparseGPTOptions(), "gradient": GradientOptions(gradient_blocks=8)}
# Structured: 25 % of MLP channels (1536 -> 1152, a multiple of 32), and 25 % of heads, which
# on SmolLM2 (9 query heads in 3 KV groups) rounds to one query head per group (3 of 9).
STRUCTURED = {
    "mlp_channels": MLPChannelsPattern(kind="mlp_channels", ratio=0.25, multiple=32),
    "heads": HeadsPattern(kind="heads", ratio=0.25, mode="query"),
}
# Layer ratios: uniform against OWL at 50 % (the setting) and at 70 %, where the
# OWL paper reports its gains. Rows carry "layer_ratios" and "study" so the main table's
# comparisons stay on the uniform rows.
OWL_STUDY = [("wanda", 0.5), ("sparsegpt", 0.5), ("wanda", 0.7)]
BLOCKS = BlocksPattern(kind="blocks", count=3)
SPEED = SpeedConfig(prompt_tokens=32, decode_tokens=32, prefill_tokens=512, repeats=3, warmup=1)


def prune_dense(
    bundle: Any,
    dense_state: dict[str, torch.Tensor],
    method: str,
    pattern: Any,
    blocks: dict[str, torch.Tensor],
    args: argparse.Namespace,
    compute: torch.dtype,
) -> tuple[Any, dict[str, Any], float]:
    """The dense weights back, then ``method`` at ``pattern``: (masks, report, seconds)."""
    bundle.model.load_state_dict(dense_state)
    start = time.perf_counter()
    masks, report = prune_(
        bundle,
        method,
        pattern,
        blocks["calibration"],
        args.batch_size,
        options=OPTIONS.get(method),
        compute_dtype=compute,
    )
    return masks, report, time.perf_counter() - start


def default_text(validation: int = 32, calibration: int = 64) -> DataConfig:
    """The benches' text: the default recipe's (Python's documentation topics), 512-token
    blocks, 32 for test, the rest for healing."""
    return DataConfig.model_validate(
        {
            "sources": [{"kind": "pydoc_topics"}],
            "block_size": 512,
            "splits": {"test": 32, "validation": validation, "calibration": calibration, "healing": "rest"},
        }
    )


def machine() -> str:
    cpu = "unknown cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calibration", type=int, default=64, help="calibration blocks of 512 tokens")
    parser.add_argument("--validation", type=int, default=32, help="validation blocks of 512 tokens")
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench/results/prune_quality.json"))
    parser.add_argument(
        "--plot-only", action="store_true", help="redraw the PNG from the JSON at --out, measure nothing"
    )
    parser.add_argument(
        "--scaffold",
        action="store_true",
        help="only the scaffold study (low-rank + sparse against Wanda and SparseGPT at the same count of "
        "numbers), written into the JSON at --out beside the rows already there",
    )
    args = parser.parse_args()
    if args.plot_only:
        rows = json.loads(args.out.read_text())["rows"]
        extra = [{**r, "method": "influence"} for r in json.loads(args.out.read_text()).get("extra_rows", [])]
        write_bytes_atomic(args.out.with_suffix(".png"), figure_png(rows + extra, rows[0]["ppl"]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    compute = getattr(torch, args.compute_dtype)
    if args.scaffold:
        return scaffold_study(args, compute)

    config = default_text(args.validation, args.calibration)
    bundle = modeling.load_model(DefaultModel(kind="default"))
    blocks, _ = data.build_blocks(config, bundle.tokenizer)
    dense_state = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    validation = blocks["validation"]

    def ppl() -> float:
        return evaluate.perplexity(bundle.model, validation, 4, desc="validation perplexity")["ppl"]

    def timing() -> dict:
        measured = speed.measure_speed(bundle.model, blocks["test"].reshape(-1), SPEED, torch.device("cpu"))
        return {
            "params": evaluate.parameter_count(bundle.model),
            "decode_tokens_per_s": measured["decode_tokens_per_s"],
            "prefill_tokens_per_s": measured["prefill_tokens_per_s"],
        }

    rows = [{"method": "dense", "pattern": "none", "sparsity": 0.0, "ppl": ppl(), "seconds": 0.0, **timing()}]
    log.info("dense: ppl %.3f", rows[0]["ppl"])
    masks_of = {}
    for pattern_name, pattern in PATTERNS.items():
        for method in METHODS:
            masks, report, seconds = prune_dense(bundle, dense_state, method, pattern, blocks, args, compute)
            masks_of[(method, pattern_name)] = masks
            row = {
                "method": method,
                "pattern": pattern_name,
                "sparsity": report["sparsity"],
                "ppl": ppl(),
                "seconds": seconds,
                "compute_dtype": args.compute_dtype,
            }
            rows.append(row)
            log.info(
                "%s %s: sparsity %.4f, ppl %.3f, %.1f s", method, pattern_name, row["sparsity"], row["ppl"], seconds
            )

    # Structured: the tensors shrink, so each run starts from a fresh copy of the dense model.
    for pattern_name, pattern in STRUCTURED.items():
        for method in ("magnitude", "wanda"):
            bundle.model.load_state_dict(dense_state)
            dense_model = bundle.model
            bundle.model = copy.deepcopy(dense_model)
            report = prune_structure_(
                bundle, pattern, blocks["calibration"], args.batch_size, compute_dtype=compute, criterion=method
            )
            row = {
                "method": method,
                "pattern": pattern_name,
                "sparsity": report["sparsity"],
                "ppl": ppl(),
                "seconds": report["seconds"],
                "compute_dtype": args.compute_dtype,
                **timing(),
            }
            rows.append(row)
            log.info(
                "%s %s: %.4f of block weights removed, ppl %.3f, %.1f s, prefill %.0f tok/s",
                method,
                pattern_name,
                row["sparsity"],
                row["ppl"],
                row["seconds"],
                row["prefill_tokens_per_s"],
            )
            bundle.model = dense_model

    # Same inputs, same masks: Wanda at 50 % once more, compared bit for bit.
    bundle.model.load_state_dict(dense_state)
    again, _ = prune_(
        bundle, "wanda", PATTERNS["unstructured"], blocks["calibration"], args.batch_size, compute_dtype=compute
    )
    repeatable = again.equals(masks_of[("wanda", "unstructured")])

    # Wanda in float32 too, for the timing target and to show what bfloat16 changes.
    bundle.model.load_state_dict(dense_state)
    start = time.perf_counter()
    _, report = prune_(bundle, "wanda", PATTERNS["unstructured"], blocks["calibration"], args.batch_size)
    fp32 = {
        "method": "wanda",
        "pattern": "unstructured",
        "sparsity": report["sparsity"],
        "ppl": ppl(),
        "seconds": time.perf_counter() - start,
        "compute_dtype": "float32",
    }
    rows.append(fp32)

    # Per-block sparsities: OWL against uniform (70 % uniform is new; 50 % uniform is above).
    for method, sparsity in OWL_STUDY:
        for ratios in ("uniform", "owl") if sparsity != 0.5 else ("owl",):
            bundle.model.load_state_dict(dense_state)
            start = time.perf_counter()
            _, report = prune_(
                bundle,
                method,
                UnstructuredPattern(kind="unstructured", sparsity=sparsity),
                blocks["calibration"],
                args.batch_size,
                options=OPTIONS.get(method),
                compute_dtype=compute,
                layer_ratios=OWLOptions() if ratios == "owl" else None,
            )
            row = {
                "method": method,
                "pattern": "unstructured",
                "sparsity": report["sparsity"],
                "ppl": ppl(),
                "seconds": time.perf_counter() - start,
                "compute_dtype": args.compute_dtype,
                "layer_ratios": ratios,
                "study": "layer_ratios",
            }
            if ratios == "owl":
                row["block_sparsity"] = [round(v, 4) for v in report["block_sparsity"]]
            rows.append(row)
            log.info("%s %.0f%% %s: ppl %.3f, %.1f s", method, 100 * sparsity, ratios, row["ppl"], row["seconds"])

    # Whole blocks, ranked by block influence (not one of the schema's criteria: kept apart).
    bundle.model.load_state_dict(dense_state)
    dense_model = bundle.model
    bundle.model = copy.deepcopy(dense_model)
    report = prune_structure_(bundle, BLOCKS, blocks["calibration"], args.batch_size, compute_dtype=compute)
    extra_rows = [
        {
            "criterion": "block_influence",
            "pattern": "blocks",
            "blocks_removed": report["removed"]["blocks"],
            "sparsity": report["sparsity"],
            "ppl": ppl(),
            "seconds": report["seconds"],
            "compute_dtype": args.compute_dtype,
            **timing(),
        }
    ]
    bundle.model = dense_model
    log.info("blocks %s removed: ppl %.3f", extra_rows[0]["blocks_removed"], extra_rows[0]["ppl"])

    main_rows = [r for r in rows if "study" not in r]
    by = {(r["method"], r["pattern"], r.get("compute_dtype")): r for r in main_rows}
    dense = rows[0]["ppl"]
    targets = []
    for pattern_name in PATTERNS:
        m, w, s = (by[(k, pattern_name, args.compute_dtype)]["ppl"] for k in ("magnitude", "wanda", "sparsegpt"))
        targets.append(
            {
                "target": f"sparsegpt <= wanda <= magnitude at {pattern_name}",
                "value": f"{s:.3f} / {w:.3f} / {m:.3f}",
                "met": s <= w <= m,
            }
        )
    wanda = by[("wanda", "unstructured", args.compute_dtype)]
    targets += [
        {
            "target": "wanda 50% within +110% of dense",
            "value": f"{100 * (wanda['ppl'] / dense - 1):+.1f}%",
            "met": wanda["ppl"] <= 2.1 * dense,
        },
        {
            "target": f"wanda under 60 s ({args.compute_dtype})",
            "value": f"{wanda['seconds']:.1f} s",
            "met": wanda["seconds"] < 60,
        },
        {"target": "wanda under 60 s (float32)", "value": f"{fp32['seconds']:.1f} s", "met": fp32["seconds"] < 60},
        {
            "target": "sparsegpt under 300 s",
            "value": f"{max(by[('sparsegpt', p, args.compute_dtype)]['seconds'] for p in PATTERNS):.1f} s",
            "met": all(by[("sparsegpt", p, args.compute_dtype)]["seconds"] < 300 for p in PATTERNS),
        },
        {"target": "same run, same masks (bit for bit)", "value": str(repeatable), "met": repeatable},
    ]

    owl_at = {(r["method"], round(r["sparsity"], 2), r["layer_ratios"]): r for r in rows if "study" in r}
    owl_at.update({(m, 0.5, "uniform"): by[(m, "unstructured", args.compute_dtype)] for m in ("wanda", "sparsegpt")})
    for method, sparsity in OWL_STUDY:
        uniform, owl = owl_at[(method, sparsity, "uniform")]["ppl"], owl_at[(method, sparsity, "owl")]["ppl"]
        targets.append(
            {
                "target": f"{method} {sparsity:.0%}: OWL perplexity below uniform",
                "value": f"{owl:.3f} vs {uniform:.3f}",
                "met": owl < uniform,
            }
        )

    for pattern_name in STRUCTURED:
        cut = by[("wanda", pattern_name, args.compute_dtype)]
        ratio = cut["prefill_tokens_per_s"] / rows[0]["prefill_tokens_per_s"]
        targets.append(
            {
                "target": f"{pattern_name} (wanda) prefill faster than dense, torch",
                "value": f"{ratio:.2f}x",
                "met": ratio > 1,
            }
        )

    print(
        f"\n{'method':<10} {'pattern':<13} {'dtype':<9} {'sparsity':>8} {'ppl':>9} {'x dense':>8} {'seconds':>8} "
        f"{'prefill/s':>9} {'decode/s':>8}"
    )
    for r in rows:
        label = r["pattern"] + (" owl" if r.get("layer_ratios") == "owl" else "")
        print(
            f"{r['method']:<10} {label:<13} {r.get('compute_dtype', '-'):<9} {r['sparsity']:>8.4f} "
            f"{r['ppl']:>9.3f} {r['ppl'] / dense:>8.3f} {r['seconds']:>8.1f} "
            f"{r.get('prefill_tokens_per_s', float('nan')):>9.0f} {r.get('decode_tokens_per_s', float('nan')):>8.1f}"
        )
    for r in extra_rows:
        print(
            f"{'influence':<10} {'blocks':<13} {r['compute_dtype']:<9} {r['sparsity']:>8.4f} {r['ppl']:>9.3f} "
            f"{r['ppl'] / dense:>8.3f} {r['seconds']:>8.1f} {r['prefill_tokens_per_s']:>9.0f} "
            f"{r['decode_tokens_per_s']:>8.1f}   (blocks {r['blocks_removed']} removed)"
        )
    print()
    for t in targets:
        print(f"{'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']}")

    result = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "settings": {
            "calibration_blocks": args.calibration,
            "validation_blocks": args.validation,
            "block_size": 512,
            "batch_size": args.batch_size,
            "compute_dtype": args.compute_dtype,
            "text": "pydoc_topics",
        },
        "rows": rows,
        "extra_rows": extra_rows,
        "targets": targets,
    }
    if args.out.is_file() and "scaffold" in (earlier := json.loads(args.out.read_text())):
        result["scaffold"] = earlier["scaffold"]  # the scaffold study (--scaffold) stays
    write_json_atomic(args.out, result)
    extra = [{**r, "method": "influence"} for r in extra_rows]
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(rows + extra, dense))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 0


# The scaffold study: the same count of numbers kept (the factors' numbers count as kept).
SCAFFOLD_STUDY = {"sparsity": [0.5, 0.7], "rank_share": [0.1, 0.25], "iterations": 20}


def scaffold_study(args: argparse.Namespace, compute: torch.dtype) -> int:
    """Scaffold (low-rank + sparse) against Wanda and SparseGPT at equal numbers kept, in one
    run; its rows go into ``scaffold`` of the JSON at ``--out`` (the other rows stay)."""
    from birdbone.core.lowrank import add_factors_
    from birdbone.core.prune.scaffold import scaffold_

    config = default_text(args.validation, args.calibration)
    bundle = modeling.load_model(DefaultModel(kind="default"))
    blocks, _ = data.build_blocks(config, bundle.tokenizer)
    dense_state = {k: v.clone() for k, v in bundle.model.state_dict().items()}
    block_numbers = sum(lin.weight.numel() for lin in bundle.adapter.linears(bundle.model).values())

    def ppl() -> float:
        return evaluate.perplexity(bundle.model, blocks["validation"], 4, desc="validation perplexity")["ppl"]

    rows = [{"method": "dense", "sparsity": 0.0, "ppl": ppl(), "seconds": 0.0}]
    for sparsity in SCAFFOLD_STUDY["sparsity"]:
        pattern = UnstructuredPattern(kind="unstructured", sparsity=sparsity)
        for method in ("wanda", "sparsegpt"):
            _, report, seconds = prune_dense(bundle, dense_state, method, pattern, blocks, args, compute)
            rows.append(
                {
                    "method": method,
                    "sparsity": report["sparsity"],
                    "numbers_kept": 1 - report["sparsity"],
                    "ppl": ppl(),
                    "seconds": seconds,
                }
            )
            log.info("%s %.0f%%: ppl %.3f", method, 100 * sparsity, rows[-1]["ppl"])
        for share in SCAFFOLD_STUDY["rank_share"]:
            bundle.model.load_state_dict(dense_state)
            masks, factors, report = scaffold_(
                bundle,
                sparsity,
                blocks["calibration"],
                share,
                SCAFFOLD_STUDY["iterations"],
                args.batch_size,
                compute_dtype=compute,
            )
            add_factors_(bundle, factors)  # what the sparse model computes with its scaffold adapter
            factor_numbers = sum(b.numel() + a.numel() for b, a in factors.values())
            rows.append(
                {
                    "method": "scaffold",
                    "rank_share": share,
                    "sparsity": report["sparsity"],
                    "sparse_part_sparsity": report["sparse_part_sparsity"],
                    "numbers_kept": 1 - report["sparsity"],
                    "factor_share": factor_numbers / block_numbers,
                    "mean_rank": sum(report["ranks"].values()) / len(report["ranks"]),
                    "ppl": ppl(),
                    "seconds": report["seconds"],
                }
            )
            log.info("scaffold %.0f%% (rank share %.2f): ppl %.3f", 100 * sparsity, share, rows[-1]["ppl"])
    dense = rows[0]["ppl"]
    print(f"\n{'method':<20} {'kept':>6} {'S sparsity':>10} {'ppl':>9} {'x dense':>8} {'seconds':>8}")
    for r in rows:
        label = r["method"] + (f" k={r['rank_share']}" if "rank_share" in r else "")
        print(
            f"{label:<20} {1 - r['sparsity']:>6.3f} {r.get('sparse_part_sparsity', r['sparsity']):>10.4f} "
            f"{r['ppl']:>9.3f} {r['ppl'] / dense:>8.3f} {r['seconds']:>8.1f}"
        )
    result = json.loads(args.out.read_text()) if args.out.is_file() else {"rows": []}
    result["scaffold"] = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "settings": {**SCAFFOLD_STUDY, "calibration_blocks": args.calibration, "compute_dtype": args.compute_dtype},
        "rows": rows,
    }
    write_json_atomic(args.out, result)
    write_bytes_atomic(args.out.with_name("prune_scaffold.png"), scaffold_png(rows))
    print(f"\nwrote the scaffold study into {args.out} and {args.out.with_name('prune_scaffold.png')}")
    return 0


def scaffold_png(rows: list[dict]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = rows[0]["ppl"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, color in (("wanda", "tab:orange"), ("sparsegpt", "tab:blue"), ("scaffold", "tab:green")):
        for share in sorted({r.get("rank_share") for r in rows if r["method"] == method}, key=str):
            mine = sorted(
                (r for r in rows if r["method"] == method and r.get("rank_share") == share), key=lambda r: r["sparsity"]
            )
            label = method + (f" (rank share {share})" if share is not None else "")
            ax.plot(
                [1 - r["sparsity"] for r in mine],
                [r["ppl"] for r in mine],
                "o-",
                color=color,
                label=label,
                alpha=1.0 if share in (None, 0.25) else 0.5,
            )
    ax.axhline(dense, color="black", linestyle="--", lw=0.8, label=f"dense {dense:.2f}")
    ax.set(
        xlabel="share of block-Linear numbers kept",
        ylabel="validation perplexity (log)",
        yscale="log",
        title="Scaffold (low-rank + sparse) against pruning at the same count",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return plots.png_bytes(fig)


def figure_png(rows: list[dict], dense: float) -> bytes:
    """Horizontal bars: perplexity (log scale, dense as a line) and pruning wall time."""

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r["method"] != "dense"][::-1]
    labels = [
        f"{r['method']} | {r['pattern']}{' ' + format(r['sparsity'], '.0%') if r['pattern'] == 'unstructured' else ''}"
        f"{' | OWL' if r.get('layer_ratios') == 'owl' else ''} | {r.get('compute_dtype', '')}"
        for r in shown
    ]
    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 0.42 * len(shown) + 1.6), sharey=True)
    a.barh(labels, [r["ppl"] for r in shown], color="tab:blue")
    a.axvline(dense, color="black", linestyle="--", label=f"dense {dense:.2f}")
    a.set_xscale("log")
    for y, r in enumerate(shown):
        a.text(r["ppl"], y, f" {r['ppl']:.4g}", va="center", fontsize=7)
    a.set(xlabel="validation perplexity (log scale)", title="Perplexity after one-shot pruning (SmolLM2-135M)")
    a.legend(loc="lower right")
    b.barh(labels, [r["seconds"] for r in shown], color="tab:orange")
    b.axvline(60, color="black", linestyle=":", label="60 s")
    b.set(xlabel="seconds (pruning, 2 cores)", title="Wall time")
    b.legend(loc="lower right")
    fig.tight_layout()
    return plots.png_bytes(fig)


if __name__ == "__main__":
    sys.exit(main())
