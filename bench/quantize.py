"""Quantization on the default model and on the healed one: round-to-nearest against GPTQ on
the same grid, mixed precision against uniform 4-bit at the same average bits.

    .venv/bin/kedro run                                   # first: writes models/healed
    .venv/bin/python bench/quantize.py                    # the reported run
    .venv/bin/python bench/quantize.py --only default/rtn --test 8   # quick look

Two models:

- ``default``: SmolLM2-135M as the package ships it. Its weights were stored as Q4_1 (4-bit
  asymmetric groups of 32), so that grid is lossless on it and any other 4-bit grid loses
  whatever the rounding. ``keep`` rows let bird-bone detect the source grid and keep to it.
- ``healed``: the default recipe's result (Wanda 50 % in waves, LoRA healing in each wave
  and a final heal: ``models/healed`` of ``kedro run``), whose weights healing moved off
  any grid. ``fake-quant heal`` rows redo that final heal from ``models/decayed`` (same
  steps, learning rate, distillation) with the setting's grids simulated in the forward
  pass (``heal.final.fake_quant``), then quantize: against quantizing the healed model.

Settings: ``none`` (unquantized), ``rtn`` and ``gptq`` (act-order, 32 calibration blocks)
on the symmetric (Q4_0: 4.5 bits per weight with its float16 scales) and asymmetric (Q4_1:
5.0) 4-bit grids of 32, and ``mixed``: 8 or 4 bits per layer by usage at 4.5 average bits
(groups of 64, GPTQ rounding), and the same with 3 to 8 bits in groups of 32; both are
compared with the uniform symmetric 4-bit grid of the same 4.5 average bits. Perplexity
on the test split and on another kind of text.

Prints a table, writes JSON (bench/results/quantize.json) and a PNG beside it, and checks
the targets: on ``default`` the 4-bit result is within +0.3 % of unquantized; on ``healed``
GPTQ beats round-to-nearest on the same grid, and mixed at 4.5 bits is within +3 %.
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

import yaml  # noqa: E402
from heal import other_blocks  # noqa: E402
from prune_quality import default_text, machine  # noqa: E402

from birdbone.config import DefaultModel, HealConfig, QuantizeConfig  # noqa: E402
from birdbone.core import data, evaluate, modeling, plots  # noqa: E402
from birdbone.core.heal import heal_, healing_view  # noqa: E402
from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from birdbone.core.lowrank import add_factors_, correction_bits  # noqa: E402
from birdbone.core.quantize import (  # noqa: E402
    QuantTable,  # noqa: E402
    average_bits,
    check_quantize,
    linear_sizes,  # noqa: E402
)
from birdbone.datasets import ModelDataset  # noqa: E402
from birdbone.pipelines.quantize.nodes import (  # noqa: E402
    corrected_weights,
    corrections_for,
    plan,
    planned_grids,
    quantize_with,
)

log = logging.getLogger("bench.quantize")

# setting -> QuantizeConfig overrides (``none``: unquantized)
SETTINGS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "rtn sym": {"method": "rtn", "sym": True, "keep_source_grid": False},
    "gptq sym": {"method": "gptq", "sym": True, "keep_source_grid": False},
    "rtn asym": {"method": "rtn", "sym": False, "keep_source_grid": False},
    "gptq asym": {"method": "gptq", "sym": False, "keep_source_grid": False},
    "rtn sym, keep source grid": {"method": "rtn", "sym": True, "keep_source_grid": True},
    "mixed 4.5": {
        "method": "gptq",
        "sym": True,
        "mixed": {"enabled": True, "avg_bits": 4.5, "levels": [8, 4], "group": 64},
    },
    "mixed 4.5, 3-8 bits g32": {
        "method": "gptq",
        "sym": True,
        "mixed": {"enabled": True, "avg_bits": 4.5, "levels": [8, 6, 5, 4, 3], "group": 32},
    },
}
# a low-rank correction of each layer's quantization error (a LoRA adapter; its float16
# numbers count in the bits per weight)
for rank in (4, 16):
    SETTINGS[f"gptq sym, correction rank {rank}"] = {**SETTINGS["gptq sym"], "lowrank": {"correction_rank": rank}}
# mixed precision with a rank-4 correction inside the same 4.5 bits (the corrections' bits
# come out of the weights' budget)
for name in ("mixed 4.5", "mixed 4.5, 3-8 bits g32"):
    SETTINGS[f"{name}, correction rank 4 in budget"] = {**SETTINGS[name], "lowrank": {"correction_rank": 4}}
# the same settings after a final heal with their grids simulated (fake-quant, from models/decayed)
# (round-to-nearest is what the fake-quant simulates; GPTQ afterwards rounds differently)
FAKE_QUANT = {
    "fake-quant heal, rtn sym": "rtn sym",
    "fake-quant heal, gptq sym": "gptq sym",
    "fake-quant heal, mixed 4.5 (rtn)": "mixed 4.5",
    "fake-quant heal, mixed 4.5, 3-8 bits g32 (rtn)": "mixed 4.5, 3-8 bits g32",
    "fake-quant heal, rtn sym, correction rank 4": "rtn sym",
    "fake-quant heal +96 steps from healed, mixed 4.5, 3-8 bits g32 (rtn)": "mixed 4.5, 3-8 bits g32",
}
# a longer fake-quant heal: 96 more steps started from models/healed (after its 48-step plain heal)
LONGER = {"fake-quant heal +96 steps from healed, mixed 4.5, 3-8 bits g32 (rtn)": ("healed", 96)}
SETTINGS.update(
    {
        name: {
            **SETTINGS[base],
            "fake_quant": True,
            **({"method": "rtn"} if "(rtn)" in name else {}),
            **({"lowrank": {"correction_rank": 4}} if "correction rank 4" in name else {}),
        }
        for name, base in FAKE_QUANT.items()
    }
)
MODELS = {
    "default": list(SETTINGS),
    "healed": [
        "none",
        "rtn sym",
        "gptq sym",
        "rtn asym",
        "gptq asym",
        "mixed 4.5",
        "mixed 4.5, 3-8 bits g32",
        "gptq sym, correction rank 4",
        "gptq sym, correction rank 16",
        "mixed 4.5, correction rank 4 in budget",
        "mixed 4.5, 3-8 bits g32, correction rank 4 in budget",
        *FAKE_QUANT,
    ],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--healed", type=Path, default=Path("models/healed"), help="the healed model directory")
    parser.add_argument("--decayed", type=Path, default=Path("models/decayed"), help="the model before the final heal")
    parser.add_argument("--test", type=int, default=32, help="test blocks of 512 tokens the numbers are on")
    parser.add_argument("--only", action="append", help="model/setting to run (repeatable)")
    parser.add_argument("--other-text", type=Path, default=Path("/usr/share/common-licenses"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/quantize.json"))
    parser.add_argument("--merge", action="store_true", help="replace the rows measured now in --out, keep the others")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out")
    args = parser.parse_args()
    if args.plot_only:
        write_bytes_atomic(args.out.with_suffix(".png"), figure_png(json.loads(args.out.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)
    config = default_text()
    wanted = [(m, s) for m, settings in MODELS.items() for s in settings]
    if args.only:
        wanted = [(m, s) for m, s in wanted if f"{m}/{s}" in args.only or m in args.only]
    if any(m == "healed" for m, _ in wanted) and not (args.healed / "birdbone.json").is_file():
        log.error(
            "no healed model at %s: run `kedro run` first (it writes models/healed), or pass --healed", args.healed
        )
        return 2
    if (
        any(SETTINGS[s] and SETTINGS[s].get("fake_quant") for _, s in wanted)
        and not (args.decayed / "birdbone.json").is_file()
    ):
        log.error("no decayed model at %s: run `kedro run` first (it writes models/decayed)", args.decayed)
        return 2
    rows = []
    for model_name in dict.fromkeys(m for m, _ in wanted):
        bundle = load(model_name, args.healed)
        blocks, _ = data.build_blocks(config, bundle.tokenizer)
        test = blocks["test"][: args.test]
        other = other_blocks(args.other_text, bundle.tokenizer, 16)
        settings = [s for m, s in wanted if m == model_name]
        for setting in settings:  # every setting must fit the model before any is measured
            if SETTINGS[setting] is not None:
                check_quantize(bundle, quantize_config(setting))
        healer = FakeQuantHealer(args.decayed, args.healed, blocks)
        for setting in settings:
            rows.append(measure(bundle, model_name, setting, blocks, test, other, healer))
            log.info("%s / %s: %s", model_name, setting, json.dumps(rows[-1]))
            write_json_atomic(args.out.with_suffix(".partial.json"), {"rows": rows})  # a crash keeps what is done
    if args.merge and args.out.is_file():
        measured = {(r["model"], r["setting"]) for r in rows}
        old = [r for r in json.loads(args.out.read_text())["rows"] if (r["model"], r["setting"]) not in measured]
        order = [(m, s) for m, settings in MODELS.items() for s in settings]
        rows = sorted(old + rows, key=lambda r: order.index((r["model"], r["setting"])))
    report = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "test_blocks": args.test,
        "other_text": str(args.other_text),
        "rows": rows,
    }
    print(table(rows))
    write_json_atomic(args.out, report)
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(report))
    return check(rows)


def load(name: str, healed: Path) -> modeling.ModelBundle:
    if name == "default":
        return modeling.load_model(DefaultModel(kind="default"))
    return ModelDataset(str(healed)).load()


def quantize_config(setting: str) -> QuantizeConfig:
    return QuantizeConfig(enabled=True, **{k: v for k, v in (SETTINGS[setting] or {}).items() if k != "fake_quant"})


class FakeQuantHealer:
    """The default recipe's final heal of ``models/decayed``, redone against a setting's
    grids; one healed model per grid plan (rtn and gptq on one grid share it)."""

    def __init__(self, decayed: Path, healed: Path, blocks: dict[str, torch.Tensor]):
        self.start, self.blocks = {"decayed": decayed, "healed": healed}, blocks
        base = yaml.safe_load(Path("conf/base/parameters_heal.yml").read_text())["heal"]
        self.config = HealConfig.model_validate(base)
        self.teacher: dict[str, torch.Tensor] | None = None
        self.healed: dict[str, tuple[modeling.ModelBundle, dict[str, Any]]] = {}

    def heal(
        self, config: QuantizeConfig, start: str = "decayed", steps: int | None = None
    ) -> tuple[modeling.ModelBundle, dict[str, Any]]:
        steps = steps or self.config.final.steps
        key = json.dumps(config.model_dump(mode="json", exclude={"method", "lowrank"}), sort_keys=True)
        key += f"{start}/{steps}"
        if key not in self.healed:
            bundle = ModelDataset(str(self.start[start])).load()
            if self.teacher is None and self.config.distill > 0:
                dense = modeling.load_model(DefaultModel(kind="default"))
                view = healing_view(self.blocks["healing"], self.config)
                self.teacher = evaluate.teacher_topk(dense.model, view, self.config.distill_top_k, 4, "cpu")
            grids, _, _ = plan(bundle, config, self.blocks, "cpu")
            report = heal_(
                bundle,
                bundle.masks,
                self.blocks["healing"],
                self.config,
                steps,
                self.config.final.lr,
                self.teacher,
                self.blocks["validation"],
                "cpu",
                desc="final heal (fake-quant)",
                fake_quant=grids,
            )
            info = {"heal_from": start, "heal_steps": report.steps, "heal_seconds": round(report.seconds, 1)}
            info["ppl_unquantized"] = evaluate.perplexity(bundle.model, self.blocks["test"], 4, "cpu", "healed")["ppl"]
            bundle.quant = QuantTable(grids)  # as the heal node leaves it: the quantize stage keeps these grids
            self.healed[key] = (bundle, info)
        return self.healed[key]


def measure(
    bundle: modeling.ModelBundle,
    model_name: str,
    setting: str,
    blocks: dict[str, torch.Tensor],
    test: torch.Tensor,
    other: torch.Tensor | None,
    healer: FakeQuantHealer,
) -> dict[str, Any]:
    overrides = SETTINGS[setting]
    row: dict[str, Any] = {"model": model_name, "setting": setting}
    if overrides is None:
        work = bundle
        row.update(method="none", bits=None, group=None, sym=None, avg_bits=32.0, grid="float32")
        start = time.perf_counter()
    else:
        config = quantize_config(setting)
        if overrides.get("fake_quant"):
            healed, info = healer.heal(config, *LONGER.get(setting, ()))
            row.update(heal="final heal with fake-quant", **info)
        start = time.perf_counter()
        work = copy.deepcopy(healed if overrides.get("fake_quant") else bundle)
        originals = corrected_weights(work) if config.lowrank.correction_rank else {}
        grids, source, allocation, _ = quantize_with(work, config, blocks, "cpu", planned_grids(work, config))
        extra_bits = 0.0
        if originals:
            evaluated = time.perf_counter()
            row["ppl_without_correction"] = evaluate.perplexity(work.model, test, 4, "cpu", "no correction")["ppl"]
            start += time.perf_counter() - evaluated  # the seconds are the quantizing and correcting alone
            add_factors_(work, corrections_for(work, originals, config, blocks, "cpu"))
            extra_bits = correction_bits(linear_sizes(work), config.lowrank.correction_rank)
            row["correction_rank"] = config.lowrank.correction_rank
        kept = all(g is None for g in grids.values())
        row.update(
            method=config.label,
            bits=config.mixed.levels if config.mixed.enabled else config.bits,
            group=config.mixed.group if config.mixed.enabled else config.group,
            sym=config.sym,
            avg_bits=round(average_bits(work, grids, source) + extra_bits, 4),
            grid=f"kept on the source grid {source.describe()}" if kept and source else None,
        )
        if allocation:
            row["layers_at"] = {b: sum(1 for v in allocation["bits"].values() if v == b) for b in config.mixed.levels}
            row["boosted"] = allocation["boosted"]
    row["seconds"] = round(time.perf_counter() - start, 1)
    row["ppl"] = evaluate.perplexity(work.model, test, 4, "cpu", f"{setting} (test)")["ppl"]
    row["ppl_other"] = (
        evaluate.perplexity(work.model, other, 4, "cpu", f"{setting} (other)")["ppl"] if other is not None else None
    )
    return row


def table(rows: list[dict[str, Any]]) -> str:
    base = {r["model"]: r for r in rows if r["method"] == "none"}
    lines = [
        "| model | setting | bits/weight | test ppl | vs none | other text ppl | vs none | seconds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        b = base.get(r["model"])
        rel = f"{r['ppl'] / b['ppl'] - 1:+.2%}" if b else "-"
        rel_o = f"{r['ppl_other'] / b['ppl_other'] - 1:+.2%}" if b and r["ppl_other"] and b["ppl_other"] else "-"
        other = f"{r['ppl_other']:.3f}" if r["ppl_other"] else "-"
        lines.append(
            f"| {r['model']} | {r['setting']} | {r['avg_bits']:.3f} | {r['ppl']:.3f} | {rel} | {other} | {rel_o} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def check(rows: list[dict[str, Any]]) -> int:
    """The targets; prints each with its figures. 0 when all that could be checked hold."""
    by = {(r["model"], r["setting"]): r for r in rows}
    failed = 0

    def report(ok: bool, text: str) -> None:
        nonlocal failed
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}: {text}")

    none = by.get(("default", "none"))
    keep = by.get(("default", "rtn sym, keep source grid"))
    if none and keep:
        rise = keep["ppl"] / none["ppl"] - 1
        report(rise <= 0.003, f"default, 4-bit keeping the source grid: {rise:+.2%} (target <= +0.3 %)")
    for grid in ("sym", "asym"):
        rtn, gptq = by.get(("healed", f"rtn {grid}")), by.get(("healed", f"gptq {grid}"))
        if rtn and gptq:
            report(gptq["ppl"] < rtn["ppl"], f"healed, {grid} 4-bit: GPTQ {gptq['ppl']:.3f} < RTN {rtn['ppl']:.3f}")
    for name, base in FAKE_QUANT.items():
        trained, direct = by.get(("healed", name)), by.get(("healed", base))
        if trained and direct:
            print(
                f"INFO: {base}: {trained['ppl']:.3f} after a fake-quant final heal against {direct['ppl']:.3f} "
                f"quantizing the healed model ({trained['ppl'] / direct['ppl'] - 1:+.2%})"
            )
    none = by.get(("healed", "none"))
    mixes = [r for r in rows if r["model"] == "healed" and r["method"] == "mixed"]
    mixed = min(mixes, key=lambda r: r["ppl"]) if mixes else None
    if none and mixed:
        rise = mixed["ppl"] / none["ppl"] - 1
        report(
            rise <= 0.03, f"healed, {mixed['setting']} at {mixed['avg_bits']:.3f} bits: {rise:+.2%} (target <= +3 %)"
        )
        uniform = by.get(("healed", "gptq sym"))
        if uniform:
            print(
                f"      mixed {mixed['ppl']:.3f} against uniform 4-bit GPTQ {uniform['ppl']:.3f} "
                f"at {uniform['avg_bits']:.3f} bits"
            )
    return 1 if failed else 0


def figure_png(report: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    rows = report["rows"]
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        base = next((r for r in mine if r["method"] == "none"), None)
        for r in mine:
            if r["method"] == "none":
                continue
            color = {"rtn": "tab:orange", "gptq": "tab:blue", "mixed": "tab:green"}[r["method"]]
            marker = "s" if r.get("sym") is False else "o"
            ax.scatter(r["avg_bits"], r["ppl"], color=color, marker=marker, s=60)
            ax.annotate(r["setting"], (r["avg_bits"], r["ppl"]), textcoords="offset points", xytext=(5, 3), fontsize=7)
        if base:
            ax.axhline(base["ppl"], color="black", linestyle="--", lw=0.8, label=f"unquantized {base['ppl']:.2f}")
            ax.axhline(base["ppl"] * 1.03, color="gray", linestyle=":", lw=0.8, label="+3 %")
            ax.legend(fontsize=8)
        ax.set(xlabel="bits per weight (float16 scales included)", ylabel="test perplexity", title=f"{model} model")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Quantization of SmolLM2-135M's block Linears ({report['date']})")
    fig.tight_layout()
    return plots.png_bytes(fig)


if __name__ == "__main__":
    sys.exit(main())
