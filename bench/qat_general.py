"""The fake-quant heal's loss, judged on general text: what the final heal of the dense model
against Q4_0 (the default recipe without removal) does to text no stage trains on.

    .venv/bin/python bench/qat_general.py                   # every variant (about 30 min on 2 cores)
    .venv/bin/python bench/qat_general.py --only none,kl
    .venv/bin/python bench/qat_general.py --only "q4_1 kept" --heads gptq4,gptq4_1,gptq5 --merge

Each variant starts from the default model (SmolLM2-135M), heals it for the default
recipe's 48 steps against the quantize grid (Q4_0: 4 bits, groups of 32, round to nearest,
straight-through gradient; LoRA rank 16 on every block Linear, the default text's healing
split), then quantizes it as the quantize stage does (blocks to Q4_0 by round to nearest;
the head, tied to the embedding, three ways: Q4_0 by GPTQ on the calibration split, Q4_0 by
round to nearest, Q8_0) and measures, in torch, the in-domain test split and the general
split (text the dense model wrote: ``data.general``'s 32 blocks, which no stage trains on):
perplexity, KL to dense and top-1 agreement.

- ``none``: no heal, quantized as it is;
- ``ce+kl``: next-token loss on the healing text plus the KL to the dense model's top-32
  (``heal.ce_weight: 1``, ``heal.distill: 1``: the recipe before this bench);
- ``kl``: the KL to the dense model alone (``heal.ce_weight: 0``): the quantized model is
  taught the dense model's predictions on the healing text, not the text;
- ``kl full``: the KL over the whole vocabulary, the dense model run beside the student on
  every batch (``heal.distill_top_k: null``) instead of its cached top-32;
- ``kl generated``, ``kl mixed``, ``ce+kl generated``: healed and calibrated on text the
  dense model wrote (``{kind: generated}``: 128 blocks, seed 2, cached in
  ``bench/.cache/generated``), all of the calibration and healing blocks or half of them
  (``data.mix_generated``, as the pipeline mixes them);
- ``q4_1 kept``: no heal, the blocks left on the Q4_1 grid the default model came on
  (``quantize.keep_source_grid``: lossless), only the head quantized.

``--heads`` picks the head's quantizations (default: gptq4, rtn4, q8; also gptq4_1, gptq5,
gptq5_1: GPTQ to Q4_1, Q5_0, Q5_1).

``--merge`` keeps the rows of an earlier ``--out`` that this run does not measure again.

Writes ``bench/results/qat_general.json`` and a PNG beside it and prints a table.
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

from birdbone.config import DataConfig, DefaultModel, GeneratedText, GPTQOptions, HealConfig  # noqa: E402
from birdbone.core import data, evaluate, generate, modeling, plots  # noqa: E402
from birdbone.core.heal import heal_, healing_view  # noqa: E402
from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from birdbone.core.quantize import Grid, plan_grids, quantize_model_  # noqa: E402

log = logging.getLogger("bench.qat_general")
CACHE = Path(__file__).resolve().parent / ".cache/generated"

GRID = Grid(4, 32, True)  # llama.cpp Q4_0
BASE = {  # conf/base/parameters_heal.yml's LoRA and final heal
    "rank": 16,
    "alpha": 32,
    "batch_size": 4,
    "block_length": 256,
    "pool_blocks": 256,
    "distill": 1.0,
    "distill_top_k": 32,
    "eval_every": 0,
}
VARIANTS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "ce+kl": {"ce_weight": 1.0},
    "kl": {"ce_weight": 0.0},
    # the KL over the whole vocabulary, the dense model run beside the student on every batch
    "kl full": {"ce_weight": 0.0, "distill_top_k": None},
    # healed (and calibrated) on text the dense model wrote ({kind: generated}), alone or half
    "kl generated": {"ce_weight": 0.0, "text": 1.0},
    "kl mixed": {"ce_weight": 0.0, "text": 0.5},
    "ce+kl generated": {"ce_weight": 1.0, "text": 1.0},
    "q4_1 kept": None,  # no heal, the blocks left on the grid they came on (the package's Q4_1)
}
# the generated source as conf would name it: 128 blocks of data.block_size, another seed
# than the general split's (1), cached in bench/.cache/generated
GENERATED = {"kind": "generated", "blocks": 128, "ratio": 1.0, "temperature": 1.0, "seed": 2, "batch_size": 32}
# the output head (tied to the embedding): GPTQ Q4_0 with the Hessian of the calibration
# blocks (in-domain text), round-to-nearest Q4_0, or Q8_0; --heads adds GPTQ Q4_1, Q5_0, Q5_1
HEADS = {"gptq4": (GRID, "gptq"), "rtn4": (GRID, "rtn"), "q8": (Grid(8, 32, True), "rtn")}
MORE_HEADS = {
    "gptq4_1": (Grid(4, 32, False), "gptq"),
    "gptq5": (Grid(5, 32, True), "gptq"),
    "gptq5_1": (Grid(5, 32, False), "gptq"),
}


def general_split(model: Any, tokenizer: Any, config: DataConfig) -> dict[str, torch.Tensor]:
    """``data.general`` as the pipeline makes it: the blocks and the dense model's top-k."""
    from birdbone.core.generate import sample_blocks

    settings = config.general
    blocks = sample_blocks(
        model, tokenizer, settings.blocks, config.block_size, settings.seed, settings.temperature, settings.batch_size
    )
    return {"blocks": blocks, **evaluate.teacher_topk(model, blocks, 32, 4)}


def measure(model: Any, blocks: dict[str, torch.Tensor], general: dict[str, torch.Tensor], name: str) -> dict:
    test = evaluate.perplexity(model, blocks["test"], 4, "cpu", f"{name} (test)")["ppl"]
    return {"ppl_test": test, **evaluate.general_figures(evaluate.general_quality(model, general, 4, "cpu", name))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=Path("bench/results/qat_general.json"))
    parser.add_argument("--merge", action="store_true", help="keep --out's rows this run does not measure")
    parser.add_argument("--general", type=Path, help="a run's data/03_primary/general.safetensors (else written anew)")
    parser.add_argument(
        "--heads", default=",".join(HEADS), help="comma-separated, of: " + ", ".join({**HEADS, **MORE_HEADS})
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(0)
    dense = modeling.load_model(DefaultModel(kind="default"))
    text_config = default_text()
    blocks, _ = data.build_blocks(text_config, dense.tokenizer)
    if args.general is not None:
        from safetensors.torch import load_file

        general = load_file(args.general)
    else:
        general = general_split(dense.model, dense.tokenizer, text_config)
    rows = [{"name": "dense", **measure(dense.model, blocks, general, "dense")}]
    made = None
    for name in [n for n in args.only.split(",") if n]:
        healed = copy.deepcopy(dense)
        heal: dict[str, Any] = {"steps": 0}
        text = blocks
        if VARIANTS[name] is not None:
            updates = dict(VARIANTS[name])
            ratio = updates.pop("text", None)
            if ratio is not None:  # the splits as the pipeline mixes them (data.mix_generated)
                if made is None:
                    source = GeneratedText.model_validate(GENERATED)
                    digest = generate.model_digest(dense.model)
                    made, _ = generate.generated_text(
                        dense.model, dense.tokenizer, source, text_config.block_size, digest, "cpu", CACHE
                    )
                text, mix = data.mix_generated(blocks, made, ratio)
                heal["text"] = mix
            config = HealConfig.model_validate({**BASE, **updates})
            if config.distill_top_k is None:
                teacher = dense.model  # live: the whole vocabulary, every batch
            else:
                teacher = evaluate.teacher_topk(
                    dense.model, healing_view(text["healing"], config), config.distill_top_k, config.batch_size
                )
            grids, _ = plan_grids(healed, GRID, keep_source_grid=False)
            report = heal_(
                healed, healed.masks, text["healing"], config, args.steps, args.lr, teacher, None, "cpu",
                desc=f"{name} heal", fake_quant=grids,
            )  # fmt: skip
            heal.update(steps=report.steps, heal_seconds=report.seconds)
        for head in [h for h in args.heads.split(",") if h]:
            grid, method = {**HEADS, **MORE_HEADS}[head]
            bundle = copy.deepcopy(healed)
            start = time.perf_counter()
            grids, _ = plan_grids(bundle, GRID, keep_source_grid=name == "q4_1 kept")
            quantize_model_(
                bundle, grids, "rtn", text["calibration"][:32], 4, "cpu", GPTQOptions(), head=(grid, method)
            )  # fmt: skip
            row = {"name": f"{name} / head {head}", "heal": name, "head": head, **heal}
            row.update(measure(bundle.model, blocks, general, row["name"]), seconds=time.perf_counter() - start)
            rows.append(row)
            log.info("%s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
    if args.merge and args.out.is_file():
        names = {r["name"] for r in rows}
        rows[1:1] = [r for r in json.loads(args.out.read_text())["rows"] if r["name"] not in names]
    dense_row = rows[0]
    print("| variant | test ppl | vs dense | general ppl | vs dense | general KL | top-1 = dense |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['name']} | {r['ppl_test']:.3f} | {r['ppl_test'] / dense_row['ppl_test'] - 1:+.1%} | "
            f"{r['ppl_general']:.3f} | {r['ppl_general'] / dense_row['ppl_general'] - 1:+.1%} | "
            f"{r['kl_general']:.4f} | {r['top1_general']:.3f} |"
        )
    report = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "command": "bench/qat_general.py " + " ".join(sys.argv[1:]),
        "steps": args.steps,
        "lr": args.lr,
        "grid": "Q4_0 blocks (rtn after the heal); head gptq4 / rtn4 (Q4_0) or q8 (Q8_0)",
        "rows": rows,
    }
    write_json_atomic(args.out, report)
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(rows))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    return 0


def figure_png(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(6.5, 4.5))
    for r in rows:
        ax.scatter(r["ppl_test"], r["ppl_general"], s=60)
        ax.annotate(r["name"], (r["ppl_test"], r["ppl_general"]), fontsize=9, xytext=(4, 4), textcoords="offset points")
    ax.set(
        xlabel="in-domain test perplexity",
        ylabel="general perplexity (text no stage trained on)",
        title="fake-quant heal's loss: Q4_0 blocks and head, SmolLM2-135M",
    )
    ax.grid(alpha=0.3)
    return plots.png_bytes(fig)


if __name__ == "__main__":
    sys.exit(main())
