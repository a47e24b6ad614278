"""What structure buys in llama.cpp: decode and prefill speed of the default model's shape
with blocks and MLP channels removed, blocks in Q4_0, the tied embedding/head in Q8_0 or
Q4_0, against the dense F16 file, in one interleaved run.

    .venv/bin/python bench/speed_shapes.py          # about 10 minutes on 2 cores

Speed does not depend on the values, so the shapes are cut crudely from SmolLM2-135M (the
first blocks and channels kept, round-to-nearest, no healing) and have no perplexity of
interest here: this table says which shape a recipe must reach for a speed target, before
spending an hour of healing on it. Writes ``bench/results/speed_shapes.json`` and a PNG.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prune_quality import default_text, machine  # noqa: E402
from speed import CACHE, dense_files, speed_config, time_rows  # noqa: E402

from birdbone.config import DefaultModel  # noqa: E402
from birdbone.core import data, modeling, plots, structure  # noqa: E402
from birdbone.core.export import gguf as gguf_export  # noqa: E402
from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from birdbone.core.quantize import QuantTable, rtn_  # noqa: E402

log = logging.getLogger("bench.speed_shapes")

# (blocks kept of 30, MLP channels kept of 1536)
SHAPES = [(30, 1536), (30, 1152), (30, 960), (30, 768), (26, 1536), (24, 1536), (26, 1152), (24, 1152), (20, 1152)]
HEADS = ["Q8_0", "Q4_0"]


def shaped_file(blocks: int, ffn: int, head: str, pre: str | None) -> Path:
    """The default model cut to ``blocks`` blocks of ``ffn`` MLP channels, block Linears in
    Q4_0, the embedding in ``head`` (cached)."""
    path = CACHE / f"shape_{blocks}x{ffn}_{head}.gguf"
    if path.is_file():
        return path
    bundle = modeling.load_model(DefaultModel(kind="default"))
    model, adapter = bundle.model, bundle.adapter
    n = len(adapter.blocks(model))
    structure.remove_blocks_(model, list(range(blocks, n)), adapter)
    for block in adapter.blocks(model):
        structure.keep_mlp_channels_(block.get_submodule(adapter.mlp_path), torch.arange(ffn), adapter)
    structure.record_shapes(model, adapter)
    grid = gguf_export.NATIVE["Q4_0"]
    grids, scales = {}, {}
    for i, block in enumerate(adapter.blocks(model)):
        for name, linear in adapter.block_linears(block).items():
            full = f"{adapter.blocks_path}.{i}.{name}.weight"
            grids[full], scales[full] = grid, rtn_(linear.weight.data, grid)
    bundle.quant = QuantTable(grids, scales)
    gguf_export.write_gguf(bundle, path, embedding=head, tokenizer_pre=pre, overwrite=True, progress=False)
    del bundle
    gc.collect()
    return path


def figure_png(rows: list[dict[str, Any]]) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 1, figsize=(6.5, 4.5))
    base = rows[0]
    for head, marker in zip(HEADS, "os", strict=True):
        pts = [r for r in rows[1:] if r["head"] == head]
        x = [r["bytes"] / 1e6 for r in pts]
        y = [r["decode_tok_s"] / base["decode_tok_s"] for r in pts]
        ax.scatter(x, y, marker=marker, label=f"blocks Q4_0, head {head}")
        for r, xi, yi in zip(pts, x, y, strict=True):
            ax.annotate(f"{r['blocks']}x{r['ffn']}", (xi, yi), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(2.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("file MB")
    ax.set_ylabel("decode x dense F16")
    ax.set_title("llama.cpp decode speed by shape (SmolLM2-135M, 2 threads)")
    ax.legend(fontsize=8)
    return plots.png_bytes(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed_shapes.json"))
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out")
    args = parser.parse_args()
    if args.plot_only:
        write_bytes_atomic(args.out.with_suffix(".png"), figure_png(json.loads(args.out.read_text())["rows"]))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    pre = gguf_export.source_tokenizer_pre(modeling.default_gguf_path())
    rows: list[dict[str, Any]] = [
        {"artifact": "dense_f16", "blocks": 30, "ffn": 1536, "head": "F16", "path": str(dense_files(pre)["dense_f16"])}
    ]
    for blocks, ffn in SHAPES:
        for head in HEADS:
            path = shaped_file(blocks, ffn, head, pre)
            rows.append({"artifact": path.stem, "blocks": blocks, "ffn": ffn, "head": head, "path": str(path)})
    for r in rows:
        r["bytes"] = Path(r["path"]).stat().st_size
    blocks_, _ = data.build_blocks(default_text(), modeling.load_tokenizer(DefaultModel(kind="default")))
    time_rows(rows, blocks_["test"][:2].reshape(-1), speed_config(args), args.rounds)
    base = rows[0]
    lines = ["| blocks | MLP channels | head | MB | decode tok/s | x F16 | prefill tok/s | x F16 |", "|" + " --- |" * 8]
    for r in rows:
        lines.append(
            f"| {r['blocks']} | {r['ffn']} | {r['head']} | {r['bytes'] / 1e6:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} | {r['prefill_tok_s']:.0f} | "
            f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f} |"
        )
    print("\n".join(lines))
    report = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "command": "bench/speed_shapes.py " + " ".join(sys.argv[1:]),
        "rows": [{k: v for k, v in r.items() if k != "path"} for r in rows],
    }
    write_json_atomic(args.out, report)
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(rows))
    log.info("wrote %s and %s", args.out, args.out.with_suffix(".png"))
    print(json.dumps({"out": str(args.out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
