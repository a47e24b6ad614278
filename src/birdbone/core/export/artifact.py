"""The deployable artifact of a run: the files (GGUF, HF safetensors), verified in the
tools that load them, and its speed there against the dense model in the same run.

``export_model`` is what the export stage runs; it takes an ``ExportConfig`` and plain
tensors, and imports no Kedro.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from birdbone.core import evaluate
from birdbone.core.export import gguf as gguf_export
from birdbone.core.export import hf, llamacpp, pack
from birdbone.core.io import TMP_PREFIX, atomic_dir
from birdbone.errors import ExportError

log = logging.getLogger(__name__)

GGUF_FILE = "model.gguf"
HF_DIR = "hf"
PACK_FILE = "model.pack"


def check_export(bundle: Any, config: Any) -> gguf_export.GGUFPlan | None:
    """Every check the export needs, before anything is written; the GGUF plan."""
    if "pack" in config.formats and (bundle.path is None or not (Path(bundle.path) / "birdbone.json").is_file()):
        raise ExportError(
            "the pack format compresses the model directory the model was loaded from, and this model has none. "
            "Fix: export a model loaded from a bird-bone model directory, or drop pack from export.formats."
        )
    if "gguf" not in config.formats:
        return None
    if config.verify.enabled or config.speed.enabled:
        llamacpp.require()
    return gguf_export.plan_gguf(bundle, config.gguf.float_type, config.gguf.embedding)


def simulated(bundle: Any, plan: gguf_export.GGUFPlan) -> Any:
    """A copy of ``bundle`` computing what the GGUF holds (its embedding rounded as stored)."""
    twin = copy.copy(bundle)
    twin.model = copy.deepcopy(bundle.model)
    gguf_export.simulate_(twin, plan)
    return twin


def verify_gguf(
    path: Path,
    bundle: Any,
    plan: gguf_export.GGUFPlan,
    test: torch.Tensor,
    config: Any,
    general: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The GGUF's perplexity in llama.cpp against the torch model computing the same
    numbers (the model as quantized, embedding rounded as stored), and greedy text from both;
    with the ``general`` split, the GGUF's perplexity, KL to dense and top-1 agreement with
    dense there, in llama.cpp (what the deployed file loses outside the user's text)."""
    blocks = test[: config.blocks] if config.blocks else test
    twin = simulated(bundle, plan)
    ours = evaluate.perplexity(twin.model, blocks, 4, "cpu", "torch (as the GGUF stores it)")["ppl"]
    theirs = llamacpp.perplexity(path, blocks)["ppl"]
    rel = theirs / ours - 1
    out: dict[str, Any] = {
        "blocks": int(blocks.shape[0]),
        "ppl_torch": ours,
        "ppl_llama_cpp": theirs,
        "relative_difference": rel,
        "tolerance": config.tolerance,
        "passed": abs(rel) <= config.tolerance,
    }
    if config.generate_tokens:
        prompt = blocks[0, :16].tolist()
        text = llamacpp.generate(path, prompt, config.generate_tokens)
        with torch.no_grad():
            reference = twin.model.generate(
                torch.tensor([prompt]), max_new_tokens=config.generate_tokens, do_sample=False, pad_token_id=0
            )[0, len(prompt) :].tolist()
        decode = bundle.tokenizer.decode
        out.update(
            prompt=decode(prompt),
            llama_cpp_text=decode(text),
            torch_text=decode(reference),
            same_tokens=sum(a == b for a, b in zip(text, reference, strict=False)) / max(len(reference), 1),
        )
    if general:
        measured = llamacpp.perplexity(path, general["blocks"], desc="llama.cpp (general)", teacher=general)
        out["general"] = {key: measured[key] for key in ("ppl", "kl", "top1")}
        log.info(
            "GGUF in llama.cpp on the general split: perplexity %.4f, KL to dense %.4f, top-1 agreement %.3f",
            measured["ppl"],
            measured["kl"],
            measured["top1"],
        )
    log.info(
        "GGUF verified in llama.cpp: perplexity %.4f against %.4f in torch (%+.2f %%, limit %.1f %%)",
        theirs,
        ours,
        100 * rel,
        100 * config.tolerance,
    )
    return out


def measure_speed(path: Path, dense: Any, test: torch.Tensor, config: Any, tokenizer_pre: str | None) -> dict[str, Any]:
    """llama.cpp decode and prefill tokens/s of the GGUF; with ``compare_dense``, also of
    the dense model's F16 GGUF, timed in the same run, and the ratios."""
    tokens = test.reshape(-1)
    out: dict[str, Any] = {"artifact": llamacpp.speed(path, tokens, config)}
    if config.compare_dense and dense is not None:
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX + "dense-f16-", dir=path.parent.parent) as tmp:
            dense_path = Path(tmp) / "dense_f16.gguf"
            report = gguf_export.write_gguf(
                dense, dense_path, float_type="F16", embedding="F16", tokenizer_pre=tokenizer_pre, progress=False
            )
            out["dense_f16"] = {**llamacpp.speed(dense_path, tokens, config), "bytes": report["bytes"]}
        for key in ("decode_tokens_per_s", "prefill_tokens_per_s"):
            out[f"{key.split('_')[0]}_x_dense_f16"] = out["artifact"][key] / out["dense_f16"][key]
    log.info(
        "llama.cpp speed (%s threads): decode %.1f tok/s, prefill %.1f tok/s%s",
        config.threads or "default",
        out["artifact"]["decode_tokens_per_s"],
        out["artifact"]["prefill_tokens_per_s"],
        f"; {out['decode_x_dense_f16']:.2f}x / {out['prefill_x_dense_f16']:.2f}x dense F16"
        if "dense_f16" in out
        else "",
    )
    return out


def export_model(
    bundle: Any,
    directory: str | Path,
    config: Any,
    test: torch.Tensor,
    dense: Any = None,
    tokenizer_pre: str | None = None,
    name: str | None = None,
    general: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Writes ``bundle`` into ``directory`` (whole, atomically) in ``config.formats``, then
    verifies the GGUF in llama.cpp (measuring it on the ``general`` split too, given one)
    and times it. Returns the report. ``name``: the GGUF's ``general.name``.

    Raises:
        ExportError: the model cannot be exported as configured (before writing), or the
            GGUF's perplexity in llama.cpp misses the torch model's by more than the
            tolerance (after writing: the files stay for inspection).
    """
    directory = Path(directory)
    plan = check_export(bundle, config)
    report: dict[str, Any] = {"path": str(directory), "files": {}}
    with atomic_dir(directory) as tmp:
        if plan is not None:
            report["files"]["gguf"] = gguf_export.write_gguf(
                bundle, tmp / GGUF_FILE, tokenizer_pre=tokenizer_pre, plan=plan, name=name
            )
        if "safetensors" in config.formats:
            report["files"]["safetensors"] = hf.write_hf(bundle, tmp / HF_DIR, config.safetensors.dtype)
        if "pack" in config.formats:
            stats = pack.compress_model(bundle.path, tmp / PACK_FILE)
            report["files"]["pack"] = {
                "format": "pack",
                "bytes": stats["file_bytes"],
                "bits_per_weight": stats["file_bytes"] * 8 / sum(p.numel() for p in bundle.model.parameters()),
                "ratio": stats["ratio"],
                "strategies": stats["strategies"],
                "encode_ms": stats["encode_ms"],
                "decode_ms": stats["decode_ms"],
                "loads_in": "birdbone unpack (then transformers or birdbone)",
                "lossless": True,
            }
    for key, sub in (("gguf", GGUF_FILE), ("safetensors", HF_DIR), ("pack", PACK_FILE)):  # where the files are now
        if key in report["files"]:
            report["files"][key]["path"] = str(directory / sub)
    if "safetensors" in config.formats:
        uniform = report["files"]["safetensors"]["loads_in"] == "transformers"
        report["files"]["safetensors"]["check"] = hf.check_hf(directory / HF_DIR, bundle, test[:1], uniform)
    if plan is not None and config.verify.enabled:
        report["verify"] = verify_gguf(directory / GGUF_FILE, bundle, plan, test, config.verify, general)
    verify = report.get("verify")
    if verify and not verify["passed"]:
        rel = 100 * verify["relative_difference"]
        raise ExportError(
            f"the GGUF in {directory} gives perplexity {verify['ppl_llama_cpp']:.4f} in llama.cpp against "
            f"{verify['ppl_torch']:.4f} for the torch model it came from ({rel:+.2f} %, "
            f"limit {100 * verify['tolerance']:.1f} %). The files are left there for inspection. Fix: report it "
            "with the model; as a stopgap, export.verify.tolerance can be raised."
        )
    if plan is not None and config.speed.enabled:  # only for a file that passed its check
        report["speed"] = measure_speed(directory / GGUF_FILE, dense, test, config.speed, tokenizer_pre)
    return report
