"""Peak memory and time of LoRA healing with and without gradient checkpointing
(``heal.gradient_checkpointing``), on the default model.

    .venv/bin/python bench/heal_memory.py          # about 5 minutes on 2 cores

Each setting runs in its own process (so their peaks do not mix): the model is loaded,
the RSS high-water mark is reset, then ``heal_`` trains ``--steps`` steps on batches of
``--batch`` blocks of ``--length`` tokens (the default recipe's healing shape), with the
distillation teacher. The peak RSS over healing, the seconds per step and the final
training loss are reported; the two settings run in the same invocation, so compare the
ratios. Writes ``bench/results/heal_memory.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_quality import default_text, machine  # noqa: E402

from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402


def one(checkpointing: bool, steps: int, batch: int, length: int) -> dict[str, Any]:
    """Heals in this process and returns its numbers (run by ``--child``)."""
    import time

    from birdbone.config import DefaultModel, HealConfig
    from birdbone.core import data, evaluate, memory, modeling
    from birdbone.core.heal import heal_, healing_view

    bundle = modeling.load_model(DefaultModel(kind="default"))
    blocks, _ = data.build_blocks(default_text(), bundle.tokenizer)
    config = HealConfig(
        steps=steps,
        lr=1e-3,
        rank=16,
        alpha=32,
        batch_size=batch,
        block_length=length,
        pool_blocks=64,
        distill=1.0,
        eval_every=0,
        gradient_checkpointing=checkpointing,
    )
    healing = blocks["healing"][: config.pool_blocks]
    teacher = evaluate.teacher_topk(bundle.model, healing_view(healing, config), config.distill_top_k, batch)
    resting = memory.peak().rss_bytes
    memory.reset_peak()
    start = time.perf_counter()
    report = heal_(bundle, None, healing, config, teacher=teacher)
    seconds = time.perf_counter() - start
    peak = memory.peak()
    losses = [p["loss"] for p in report.curve if "loss" in p]
    return {
        "gradient_checkpointing": checkpointing,
        "peak_rss_mb": peak.rss_bytes / 2**20,
        "rss_before_mb": resting / 2**20,
        "seconds_per_step": seconds / steps,
        "final_loss": losses[-1],
        "per_stage_peak": peak.resettable,
    }


def figure_png(report: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    from birdbone.core import plots

    rows = report["rows"]
    labels = ["checkpointing" if r["gradient_checkpointing"] else "plain" for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.5))
    left.bar(labels, [r["peak_rss_mb"] for r in rows], color=["tab:blue", "tab:green"])
    left.bar(labels, [r["rss_before_mb"] for r in rows], color="lightgrey", label="before healing")
    left.set_ylabel("peak RSS during healing (MiB)")
    left.legend(fontsize=8)
    right.bar(labels, [r["seconds_per_step"] for r in rows], color=["tab:blue", "tab:green"])
    right.set_ylabel("seconds per step")
    fig.suptitle(f"LoRA healing, batch {report['batch']} x {report['length']} tokens ({report['model']})")
    return plots.png_bytes(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--child", choices=["plain", "checkpointing"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/heal_memory.json"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child == "checkpointing", args.steps, args.batch, args.length)))
        return 0
    rows = []
    for setting in ("plain", "checkpointing"):
        command = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps)]
        command += ["--batch", str(args.batch), "--length", str(args.length)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    plain, checkpointed = rows
    print("| healing | peak RSS MiB | vs plain | s/step | vs plain | final loss |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {'checkpointing' if r['gradient_checkpointing'] else 'plain'} | {r['peak_rss_mb']:.0f} | "
            f"{r['peak_rss_mb'] / plain['peak_rss_mb']:.2f}x | {r['seconds_per_step']:.2f} | "
            f"{r['seconds_per_step'] / plain['seconds_per_step']:.2f}x | {r['final_loss']:.4f} |"
        )
    report = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "command": "bench/heal_memory.py " + " ".join(sys.argv[1:]),
        "model": "SmolLM2-135M-Instruct (float32)",
        "batch": args.batch,
        "length": args.length,
        "steps": args.steps,
        "rows": rows,
        "peak_ratio": checkpointed["peak_rss_mb"] / plain["peak_rss_mb"],
        "time_ratio": checkpointed["seconds_per_step"] / plain["seconds_per_step"],
    }
    write_json_atomic(args.out, report)
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
