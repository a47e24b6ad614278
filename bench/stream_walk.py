"""Block streaming on a model larger than we want resident: a random Llama of about 1.1 B
parameters (TinyLlama's shape, SmolLM2's vocabulary) saved to disk in float32, then
profiled and Wanda-pruned (50 %) with its decoder blocks streamed from disk one at a time.

    .venv/bin/python bench/stream_walk.py                 # the reported run
    .venv/bin/python bench/stream_walk.py --layers 4      # quick look

Each walk runs in its own process, which samples its resident memory (VmRSS) every 0.2 s
and reports its peak (VmHWM). The target: peak RSS under half the model's float32 size.
The pruned model is then checked: every block Linear at 50 % sparsity, the shards read back
by stock transformers, and its logits finite. Prints a table, writes JSON
(bench/results/stream_walk.json) and a PNG of memory over time beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_quality import machine  # noqa: E402

from birdbone.config import DataConfig, DefaultModel, ProfileConfig, UnstructuredPattern  # noqa: E402
from birdbone.core import data, modeling, plots  # noqa: E402
from birdbone.core.io import write_bytes_atomic, write_json_atomic  # noqa: E402

log = logging.getLogger("bench.stream_walk")
MiB = 1 << 20


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class RssSampler(threading.Thread):
    """Samples this process's VmRSS every ``period`` seconds."""

    def __init__(self, period: float = 0.2):
        super().__init__(daemon=True)
        self.period, self.samples, self.stop = period, [], threading.Event()
        self.start_time = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.perf_counter() - self.start_time, _status("VmRSS")))
            self.stop.wait(self.period)


def make_model(args: argparse.Namespace) -> None:
    """Writes the random model (float32 safetensors) and SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = modeling.load_tokenizer(DefaultModel(kind="default"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 512,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(args.model)
    tokenizer.save_pretrained(args.model)


def calibration(args: argparse.Namespace, tokenizer) -> torch.Tensor:
    config = DataConfig.model_validate(
        {
            "sources": [{"kind": "pydoc_topics"}],
            "block_size": 512,
            "splits": {"test": 1, "validation": 1, "calibration": args.calibration, "healing": 0},
        }
    )
    blocks, _ = data.build_blocks(config, tokenizer)
    return blocks["calibration"]


def walk(args: argparse.Namespace) -> None:
    """One streamed walk in this process; writes its timings and memory to --report."""
    from birdbone.core.profile import profile_usage
    from birdbone.core.prune import prune_
    from birdbone.core.stream import stream_blocks

    sampler = RssSampler()
    sampler.start()
    start = time.perf_counter()
    compute = torch.bfloat16 if args.compute_dtype == "bfloat16" else None
    result: dict = {"walk": args.step}
    if args.step == "profile":
        with stream_blocks(args.model) as bundle:
            blocks = calibration(args, bundle.tokenizer)
            config = ProfileConfig(
                blocks=None, batch_size=args.batch_size, compute_dtype=args.compute_dtype, gradient_blocks=0
            )
            _, summary = profile_usage(bundle, blocks, config)
        result["block_influence"] = summary["block_influence"]
    else:
        with stream_blocks(args.model, args.pruned) as bundle:
            blocks = calibration(args, bundle.tokenizer)
            pattern = UnstructuredPattern(kind="unstructured", sparsity=0.5)
            masks, report = prune_(bundle, "wanda", pattern, blocks, args.batch_size, compute_dtype=compute)
        result["sparsity"] = report["sparsity"]
        result["mask_bytes"] = sum((masks.numel(n) + 7) // 8 for n in masks)
    result["seconds"] = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    result["peak_rss"] = _status("VmHWM")
    result["rss"] = sampler.samples
    result["calibration_tokens"] = int(blocks.numel())
    args.report.write_text(json.dumps(result))


def check_pruned(path: Path, blocks_prefix: str = "model.layers.") -> dict:
    """Per-tensor sparsity read shard by shard, then a forward pass through stock transformers."""
    from safetensors import safe_open

    index = json.loads((path / "model.safetensors.index.json").read_text())
    sparsities = {}
    for name, shard in index["weight_map"].items():
        if name.startswith(blocks_prefix) and name.endswith("proj.weight"):
            with safe_open(str(path / shard), "pt") as handle:
                tensor = handle.get_tensor(name)
            sparsities[name] = float((tensor == 0).float().mean())
    bundle = modeling.load_model_dir(path)
    ids = torch.randint(0, bundle.model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = bundle.model(ids).logits
    return {
        "linears": len(sparsities),
        "min_sparsity": min(sparsities.values()),
        "max_sparsity": max(sparsities.values()),
        "logits_finite": bool(torch.isfinite(logits).all()),
    }


def figure_png(result: dict) -> bytes:

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for walk_result in result["walks"]:
        t, rss = zip(*walk_result["rss"], strict=True)
        peak = walk_result["peak_rss"] / MiB
        ax.plot(t, [r / MiB for r in rss], label=f"{walk_result['walk']} (peak {peak:,.0f} MiB)")
    fp32 = result["model"]["float32_bytes"] / MiB
    ax.axhline(fp32, color="black", linestyle="--", label=f"model in float32 ({fp32:,.0f} MiB)")
    ax.axhline(fp32 / 2, color="red", linestyle=":", label="target: half of it")
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"Streamed walks, {result['model']['params'] / 1e9:.2f} B-parameter Llama, one block resident")
    ax.set_ylim(0, fp32 * 1.1)
    ax.legend(loc="center right", fontsize=8)
    fig.tight_layout()
    return plots.png_bytes(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--calibration", type=int, default=16, help="calibration blocks of 512 tokens")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--compute-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--work", type=Path, default=Path("bench/.cache"), help="where the models are written")
    parser.add_argument("--out", type=Path, default=Path("bench/results/stream_walk.json"))
    parser.add_argument("--keep", action="store_true", help="keep the pruned model")
    parser.add_argument("--walks", default="profile,wanda", help="which streamed walks to run")
    parser.add_argument("--step", choices=["make", "profile", "wanda"], help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.work / f"llama-{args.layers}x{args.hidden}"
    args.pruned = args.work / f"llama-{args.layers}x{args.hidden}-wanda50"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.step == "make":
        make_model(args)
        return 0
    if args.step:
        walk(args)
        return 0

    forwarded = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("layers", "hidden", "intermediate")]
    forwarded += [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in ("calibration", "batch_size", "work")]
    forwarded.append(f"--compute-dtype={args.compute_dtype}")
    if not (args.model / "model.safetensors.index.json").exists() and not (args.model / "model.safetensors").exists():
        log.info("writing a random Llama to %s", args.model)
        subprocess.run([sys.executable, __file__, "--step=make", *forwarded], check=True)
    float32_bytes = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    config = json.loads((args.model / "config.json").read_text())
    from safetensors import safe_open

    params = 0
    for file in args.model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118  (a safetensors handle is not iterable)
                shape = handle.get_slice(key).get_shape()
                params += int(torch.tensor(shape).prod()) if shape else 1
    walks = []
    for step in args.walks.split(","):
        report = args.work / f"{step}.json"
        log.info("streamed %s walk (a process of its own)", step)
        subprocess.run([sys.executable, __file__, f"--step={step}", f"--report={report}", *forwarded], check=True)
        walks.append(json.loads(report.read_text()))
    checks = {"linears": 0, "min_sparsity": 0.0, "max_sparsity": 0.0, "logits_finite": True}
    if "wanda" in args.walks:
        checks = check_pruned(args.pruned)
        if not args.keep:
            shutil.rmtree(args.pruned)

    result = {
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "intermediate": args.intermediate,
            "vocab": config["vocab_size"],
            "params": params,
            "float32_bytes": float32_bytes,
        },
        "compute_dtype": args.compute_dtype,
        "walks": walks,
        "pruned_check": checks,
        "target": {"peak_rss_below": float32_bytes / 2},
    }
    print(f"\nmodel: {params / 1e9:.3f} B parameters, {float32_bytes / MiB:,.0f} MiB in float32 on disk")
    print(f"{'walk':10} {'seconds':>8} {'peak RSS MiB':>13} {'of fp32':>8}  target < 50 %")
    for w in walks:
        share = w["peak_rss"] / float32_bytes
        verdict = "met" if share < 0.5 else "MISSED"
        print(f"{w['walk']:10} {w['seconds']:8.1f} {w['peak_rss'] / MiB:13,.0f} {share:8.1%}  {verdict}")
    print(
        f"pruned: {checks['linears']} Linears at {checks['min_sparsity']:.4f}..{checks['max_sparsity']:.4f} sparsity; "
        f"stock transformers loads it, logits finite: {checks['logits_finite']}"
    )
    write_json_atomic(args.out, result)
    write_bytes_atomic(args.out.with_suffix(".png"), figure_png(result))
    ok = all(w["peak_rss"] < float32_bytes / 2 for w in walks) and checks["logits_finite"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
