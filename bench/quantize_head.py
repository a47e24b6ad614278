"""The output head quantized three ways (``quantize.head``): as the model has it, Q4_0 by
round-to-nearest, Q4_0 by GPTQ with the Hessian of the head's inputs.

    .venv/bin/python bench/quantize_head.py --model models/healed     # about 10 minutes on 2 cores

The block Linears stay as the model has them (a quantized model's stay on their grid), so
the rows differ by the head alone. Perplexity on the test split (32 x 512 tokens) and on
other text (16 x 512 tokens of ``/usr/share/common-licenses``, which no healing saw).
Writes ``bench/results/quantize_head.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heal import other_blocks  # noqa: E402
from prune_quality import default_text, machine  # noqa: E402

from birdbone.config import GPTQOptions  # noqa: E402
from birdbone.core import data, evaluate  # noqa: E402
from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from birdbone.core.quantize import Grid, quantize_model_  # noqa: E402
from birdbone.datasets import ModelDataset  # noqa: E402

log = logging.getLogger("bench.quantize_head")


def figure_png(report: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    from birdbone.core import plots

    rows = report["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["ppl_test"] for r in rows], 0.4, label="test split")
    if all(r["ppl_other"] for r in rows):
        ax.bar([i + 0.2 for i in x], [r["ppl_other"] for r in rows], 0.4, label="other text")
    ax.set_xticks(list(x), [r["head"] for r in rows])
    ax.set_ylabel("perplexity")
    ax.set_title(f"output head quantized ({report['model']})")
    ax.legend()
    return plots.png_bytes(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("models/healed"))
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--test", type=int, default=32)
    parser.add_argument("--other", type=int, default=16)
    parser.add_argument("--other-text", type=Path, default=Path("/usr/share/common-licenses"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/quantize_head.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dataset = ModelDataset(str(args.model))
    bundle = dataset.load()
    blocks, _ = data.build_blocks(default_text(), bundle.tokenizer)
    test, calibration = blocks["test"][: args.test], blocks["calibration"][:32]
    other = other_blocks(args.other_text, bundle.tokenizer, args.other) if args.other else None
    grid = Grid(args.bits, 32, True)
    rows = []
    for method in ("as it is", "rtn", "gptq"):
        bundle = dataset.load()
        row: dict[str, Any] = {"head": method if method == "as it is" else f"{grid.gguf_type()} {method}"}
        if method != "as it is":
            start = time.perf_counter()
            keep = dict.fromkeys((f"{n}.weight" for n in bundle.adapter.linears(bundle.model)), None)
            quantize_model_(bundle, keep, "rtn", calibration, 4, options=GPTQOptions(), head=(grid, method))
            row["seconds"] = time.perf_counter() - start
        row["ppl_test"] = evaluate.perplexity(bundle.model, test, 4, "cpu", f"{row['head']} (test)")["ppl"]
        row["ppl_other"] = (
            evaluate.perplexity(bundle.model, other, 4, "cpu", f"{row['head']} (other)")["ppl"]
            if other is not None
            else None
        )
        log.info("%s", row)
        rows.append(row)
    base = rows[0]
    print("| head | test ppl | vs as it is | other ppl | vs as it is |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        other_cell = "" if r["ppl_other"] is None else f"{r['ppl_other']:.3f}"
        other_rel = "" if r["ppl_other"] is None else f"{100 * (r['ppl_other'] / base['ppl_other'] - 1):+.1f} %"
        print(
            f"| {r['head']} | {r['ppl_test']:.3f} | {100 * (r['ppl_test'] / base['ppl_test'] - 1):+.1f} % | "
            f"{other_cell} | {other_rel} |"
        )
    report = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "command": "bench/quantize_head.py " + " ".join(sys.argv[1:]),
        "model": str(args.model),
        "rows": rows,
    }
    write_json_atomic(args.out, report)
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
