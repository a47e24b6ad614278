"""Healing on the default model: how much of the perplexity pruning lost does LoRA healing
win back within a fixed CPU budget, with and without distillation, gating and regrowth.

    .venv/bin/python bench/heal.py                                  # the reported run
    .venv/bin/python bench/heal.py --budget 60 --only unstructured/lora --test 8   # quick look

SmolLM2-135M is pruned once per pattern (Wanda 50 % unstructured; 25 % of MLP channels by
the Wanda channel score, removed physically), then each setting heals a fresh copy of the
pruned model for the same wall-time budget and is measured on the test split:

- ``lora``: LoRA on every block Linear, next-token loss, every sample;
- ``lora+distill``: plus the KL to the dense model's top-32 logits;
- ``lora+gating``: significance-gated samples (target rate 0.5), same wall time;
- ``lora (gating's steps)``: every sample, as many optimizer steps as gating took in that
  time: a random subset of the same size, the baseline gating must beat at equal steps;
- ``lora+gating (lora's steps)``: gating given as many optimizer steps as ``lora`` took;
- ``lora+regrow``: half the budget, RigL (5 % of the pruned connections), the other half.

Prints a table, writes JSON (bench/results/heal.json) and a PNG beside it, and checks the
target: healing recovers at least half of the perplexity 50 % unstructured pruning lost.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_quality import default_text, machine  # noqa: E402

from birdbone.config import DefaultModel, HealConfig, MLPChannelsPattern, UnstructuredPattern  # noqa: E402
from birdbone.core import data, evaluate, modeling, plots  # noqa: E402
from birdbone.core.heal import heal_, healing_view  # noqa: E402
from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from birdbone.core.masks import MaskSet  # noqa: E402
from birdbone.core.prune import prune_  # noqa: E402
from birdbone.core.prune.structured import prune_structure_  # noqa: E402
from birdbone.core.regrow import regrow_  # noqa: E402

log = logging.getLogger("bench.heal")

PATTERNS = {
    "unstructured": UnstructuredPattern(kind="unstructured", sparsity=0.5),
    "mlp_channels": MLPChannelsPattern(kind="mlp_channels", ratio=0.25, multiple=32),
}
SETTINGS = {
    "unstructured": [
        "lora",
        "lora+distill",
        "lora+gating",
        "lora (gating's steps)",
        "lora+gating (lora's steps)",
        "lora+regrow",
    ],
    "mlp_channels": ["lora", "lora+distill"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=float, default=300.0, help="healing wall time per setting, seconds")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--test", type=int, default=32, help="test blocks of 512 tokens the numbers are on")
    parser.add_argument("--only", action="append", help="pattern/setting to run (repeatable)")
    parser.add_argument(
        "--other-text",
        type=Path,
        default=Path("/usr/share/common-licenses"),
        help="a file or folder of a different kind of English, measured too (healing trains on the default "
        "text, so its test split measures healing plus adaptation to that text; this one does not)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results/heal.json"))
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace the rows measured now in the JSON at --out, keep the others (the one-shot numbers "
        "must match the stored ones: the pruning is deterministic)",
    )
    parser.add_argument("--match-steps", type=int, help="steps for a '(... steps)' setting run without its pair")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out")
    args = parser.parse_args()
    if args.plot_only:
        write_bytes_atomic(args.out.with_suffix(".png"), figure_png(json.loads(args.out.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)
    config = default_text()
    bundle = modeling.load_model(DefaultModel(kind="default"))
    blocks, _ = data.build_blocks(config, bundle.tokenizer)
    test = blocks["test"][: args.test]
    other = other_blocks(args.other_text, bundle.tokenizer, 16)
    heal = HealConfig(
        enabled=True,
        rank=args.rank,
        alpha=2.0 * args.rank,
        lr=args.lr,
        steps=100_000,  # the budget decides
        batch_size=4,
        block_length=256,
        pool_blocks=256,
        eval_every=10,
        curve_blocks=4,
        distill_top_k=32,
    )
    healing = blocks["healing"]

    def ppl(model: torch.nn.Module, what: str) -> float:
        return evaluate.perplexity(model, test, 8, desc=what)["ppl"]

    def ppl_other(model: torch.nn.Module, what: str) -> float | None:
        return None if other is None else evaluate.perplexity(model, other, 8, desc=f"{what} (other text)")["ppl"]

    start = time.perf_counter()
    dense = ppl(bundle.model, "dense")
    dense_other = ppl_other(bundle.model, "dense")
    teacher = evaluate.teacher_topk(bundle.model, healing_view(healing, heal), heal.distill_top_k, 8)
    log.info("dense test perplexity %.3f; teacher logits cached (%.0f s)", dense, time.perf_counter() - start)
    dense_state = copy.deepcopy(bundle.model)
    rows: list[dict[str, Any]] = []
    steps_of: dict[str, int] = {}
    for pattern_name, pattern in PATTERNS.items():
        wanted = [s for s in SETTINGS[pattern_name] if not args.only or f"{pattern_name}/{s}" in args.only]
        if not wanted:
            continue
        bundle.model = copy.deepcopy(dense_state)
        calibration = blocks["calibration"]
        if pattern_name == "unstructured":
            masks, _ = prune_(bundle, "wanda", pattern, calibration, 8, compute_dtype=torch.bfloat16)
        else:
            prune_structure_(bundle, pattern, calibration, 8, compute_dtype=torch.bfloat16)
            masks = None
        pruned = copy.deepcopy(bundle.model)
        oneshot = ppl(bundle.model, f"{pattern_name} one-shot")
        oneshot_other = ppl_other(bundle.model, f"{pattern_name} one-shot")
        log.info("%s one-shot: %.3f", pattern_name, oneshot)
        for setting in wanted:
            bundle.model = copy.deepcopy(pruned)
            run_masks = masks.copy() if masks is not None else None
            row = heal_setting(bundle, run_masks, healing, teacher, blocks["validation"], heal, setting, args, steps_of)
            row.update(
                pattern=pattern_name, ppl_dense=dense, ppl_oneshot=oneshot, ppl_healed=ppl(bundle.model, setting)
            )
            row["recovered"] = (oneshot - row["ppl_healed"]) / (oneshot - dense)
            if other is not None:
                healed_other = ppl_other(bundle.model, setting)
                row["other_text"] = {
                    "ppl_dense": dense_other,
                    "ppl_oneshot": oneshot_other,
                    "ppl_healed": healed_other,
                    "recovered": (oneshot_other - healed_other) / (oneshot_other - dense_other),
                }
            if run_masks is not None:  # the masks held: exactly the same zeros as after pruning
                weights = {f"{n}.weight": m.weight for n, m in bundle.adapter.linears(bundle.model).items()}
                row["masks_kept"] = MaskSet.from_weights(weights).overall_sparsity() == run_masks.overall_sparsity()
            steps_of[f"{pattern_name}/{setting}"] = row["steps"]
            log.info(
                "%s %s: %.3f -> %.3f (recovered %.0f %%) in %.0f s, %d steps",
                pattern_name,
                setting,
                oneshot,
                row["ppl_healed"],
                100 * row["recovered"],
                row["seconds"],
                row["steps"],
            )
            rows.append(row)
    commands = [" ".join(["bench/heal.py", *sys.argv[1:]])]
    if args.merge and args.out.is_file():
        rows, commands = merge_rows(json.loads(args.out.read_text()), rows, commands)
    report = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "commands": commands,
        "budget_seconds": args.budget,
        "heal": heal.model_dump(mode="json"),
        "test_tokens": int(test.numel()),
        "other_text": None if other is None else {"path": str(args.other_text), "tokens": int(other.numel())},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out, report)
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(report))
    print(table(rows))
    return check(rows)


def merge_rows(
    stored: dict[str, Any], rows: list[dict[str, Any]], commands: list[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The stored rows with those measured now replacing (or joining) them."""
    for row in rows:
        same = next((o for o in stored["rows"] if o["pattern"] == row["pattern"]), None)
        if same and abs(same["ppl_oneshot"] - row["ppl_oneshot"]) > 1e-6:
            raise SystemExit(f"one-shot perplexity {row['ppl_oneshot']} differs from the stored {same['ppl_oneshot']}")
    key = lambda r: (r["pattern"], r["setting"])  # noqa: E731
    now = {key(r): r for r in rows}
    merged = [now.pop(key(o), o) for o in stored["rows"]] + list(now.values())
    return merged, stored.get("commands", []) + commands


def other_blocks(path: Path, tokenizer: Any, count: int) -> torch.Tensor | None:
    """``count`` blocks of 512 tokens from another kind of text (files in sorted order)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    files = [f for f in files if f.exists()]
    if not files:
        log.warning("no other text at %s: measuring the default text only", path)
        return None
    ids: list[int] = []
    for file in files:
        ids += tokenizer(file.read_text(errors="replace"))["input_ids"]
        if len(ids) >= count * 512:
            break
    usable = min(count, len(ids) // 512)
    return torch.tensor(ids[: usable * 512]).reshape(usable, 512)


def heal_setting(
    bundle: Any,
    masks: MaskSet | None,
    healing: torch.Tensor,
    teacher: dict[str, torch.Tensor],
    validation: torch.Tensor,
    heal: HealConfig,
    setting: str,
    args: argparse.Namespace,
    steps_of: dict[str, int],
) -> dict[str, Any]:
    """Heals ``bundle.model`` one way; returns the row's healing numbers and curve."""
    config = heal
    seconds: float | None = args.budget
    steps = None
    if "distill" in setting:
        config = heal.model_copy(update={"distill": 1.0})
    if setting.startswith("lora+gating"):
        config = config.model_copy(update={"gating": heal.gating.model_copy(update={"enabled": True})})
    if setting == "lora (gating's steps)":
        steps, seconds = steps_of.get("unstructured/lora+gating", args.match_steps), None
    if setting == "lora+gating (lora's steps)":
        steps, seconds = steps_of.get("unstructured/lora", args.match_steps), None
    if ("steps)" in setting) and steps is None:
        raise SystemExit(f"{setting} needs the setting it matches in the same run")
    teacher_here = teacher if config.distill > 0 else None
    if setting == "lora+regrow":
        first = heal_(bundle, masks, healing, config, teacher=teacher_here, validation=validation, seconds=seconds / 2)
        assert masks is not None
        masks, grown = regrow_(bundle, masks, healing[:4], 0.05)
        second = heal_(
            bundle, masks, healing, config.model_copy(update={"seed": 1}), validation=validation, seconds=seconds / 2
        )
        curve = first.curve + [{**p, "step": p["step"] + first.steps} for p in second.curve]
        return {
            "setting": setting,
            "seconds": first.seconds + second.seconds + grown["seconds"],
            "steps": first.steps + second.steps,
            "samples_trained": first.samples_trained + second.samples_trained,
            "samples_seen": first.samples_seen + second.samples_seen,
            "regrown": grown["swapped"],
            "curve": curve,
        }
    report = heal_(
        bundle, masks, healing, config, steps=steps, teacher=teacher_here, validation=validation, seconds=seconds
    )
    return {
        "setting": setting,
        "seconds": report.seconds,
        "steps": report.steps,
        "samples_trained": report.samples_trained,
        "samples_seen": report.samples_seen,
        "stopped": report.stopped,
        "curve": report.curve,
    }


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| pattern | setting | dense | one-shot | healed | recovered | other text: dense / one-shot / healed "
        "(recovered) | seconds | steps | trained / seen |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        o = r.get("other_text")
        other = (
            f"{o['ppl_dense']:.2f} / {o['ppl_oneshot']:.2f} / {o['ppl_healed']:.2f} ({100 * o['recovered']:.0f} %)"
            if o
            else "-"
        )
        lines.append(
            f"| {r['pattern']} | {r['setting']} | {r['ppl_dense']:.3f} | {r['ppl_oneshot']:.3f} | "
            f"{r['ppl_healed']:.3f} | {100 * r['recovered']:.0f} % | {other} | {r['seconds']:.0f} | {r['steps']} | "
            f"{r['samples_trained']} / {r['samples_seen']} |"
        )
    return "\n".join(lines)


def check(rows: list[dict[str, Any]]) -> int:
    """The issue's target: at least half of the loss recovered at 50 % unstructured, on the
    default text's test split and, when measured, on the other text too (healing trains on
    the default text, so its own test split also rewards adapting to it)."""

    def both(r: dict[str, Any]) -> float:
        return min(r["recovered"], r["other_text"]["recovered"]) if r.get("other_text") else r["recovered"]

    best = max((r for r in rows if r["pattern"] == "unstructured"), key=both, default=None)
    if best is None:
        return 0
    ok = both(best) >= 0.5
    other = f", other text {100 * best['other_text']['recovered']:.0f} %" if best.get("other_text") else ""
    print(
        "target: healing recovers >= 50 % of the perplexity 50 % unstructured pruning lost: "
        f"{'met' if ok else 'NOT met'} ({best['setting']}: test split {100 * best['recovered']:.0f} %{other})"
    )
    if not all(r.get("masks_kept", True) for r in rows):
        print("a healing changed the masks")
        return 1
    return 0 if ok else 1


def figure_png(report: dict[str, Any]) -> bytes:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(20, 5.5))
    labels = [f"{r['pattern']}\n{r['setting']}" for r in rows]
    x = range(len(rows))
    texts = [
        ("the default text's test split", lambda r: r),
        ("other text (never trained on)", lambda r: r.get("other_text")),
    ]
    for ax, (title, pick) in zip(axes[:2], texts, strict=True):
        if not all(pick(r) for r in rows):
            ax.axis("off")
            continue
        ax.bar([i - 0.2 for i in x], [pick(r)["ppl_oneshot"] for r in rows], 0.4, label="one-shot", color="#c44")
        ax.bar([i + 0.2 for i in x], [pick(r)["ppl_healed"] for r in rows], 0.4, label="healed", color="#48c")
        if rows:
            ax.axhline(pick(rows[0])["ppl_dense"], color="k", ls="--", lw=1, label="dense")
        ax.set_xticks(list(x), labels, rotation=60, ha="right", fontsize=7)
        ax.set(ylabel="perplexity", title=f"{title}: healing within {report['budget_seconds']:.0f} s (2 cores)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    for r in rows:
        points = [(p["step"], p["val_ppl"]) for p in r["curve"] if p.get("val_ppl") is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker=".", label=f"{r['pattern']} {r['setting']}")
    ax.set(xlabel="optimizer step", ylabel="validation perplexity (4 blocks, adapters unmerged)", title="Curves")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return plots.png_bytes(fig)


if __name__ == "__main__":
    sys.exit(main())
