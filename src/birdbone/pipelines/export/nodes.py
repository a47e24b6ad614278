"""Export node: a thin adapter from Kedro datasets and parameters to ``birdbone.core.export``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from birdbone.config import Recipe, validate_recipe
from birdbone.core import evaluate, modeling
from birdbone.core.export import gguf
from birdbone.core.export.artifact import export_model

log = logging.getLogger(__name__)


def tokenizer_pre(recipe: Recipe) -> str | None:
    """llama.cpp's pre-tokenizer name: the recipe's, else the source GGUF's when the model
    came from one (the default model does)."""
    if recipe.export.gguf.tokenizer_pre:
        return recipe.export.gguf.tokenizer_pre
    source = recipe.model.source
    if source.kind == "default":
        return gguf.source_tokenizer_pre(modeling.default_gguf_path())
    if source.kind == "gguf":
        return gguf.source_tokenizer_pre(Path(source.path))
    return None


def model_name(recipe: Recipe) -> str:
    """The exported model's name: its source's, marked as bird-bone's (no local paths)."""
    source = recipe.model.source
    base = {
        "default": "SmolLM2-135M-Instruct",
        "hub": getattr(source, "id", ""),
        "tiny": f"tiny-{getattr(source, 'architecture', 'llama')}",
    }.get(source.kind) or Path(str(getattr(source, "path", "model"))).stem
    return f"{base} (bird-bone)"


def export(
    model: modeling.ModelBundle,
    dense: modeling.ModelBundle,
    blocks: dict[str, torch.Tensor],
    general: dict[str, torch.Tensor],
    parameters: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Exports the recipe's last model to ``export.path``; the report, ``summary.json``'s
    ``exports``, ``exports_verified`` (llama.cpp's perplexity on the test split and its
    quality on the general split) and ``speed``, and the MLflow metrics."""
    recipe = validate_recipe(parameters, Path.cwd())
    config = recipe.export
    modeling.prepare_runtime(recipe.run.model_copy(update={"device": "cpu"}))
    model.model.to("cpu")
    report = export_model(
        model, config.path, config, blocks["test"], dense, tokenizer_pre(recipe), model_name(recipe), general or None
    )
    report["recipe_hash"] = recipe.hash()
    exports = [
        {k: f[k] for k in ("format", "path", "bytes") if k in f}
        | {"bits_per_weight": f.get("bits_per_weight"), "loads_in": f.get("loads_in", "llama.cpp")}
        for f in report["files"].values()
    ]
    summary: dict[str, Any] = {"recipe_hash": recipe.hash(), "exports": exports}
    metrics: dict[str, Any] = {}
    if "verify" in report:
        verify = report["verify"]
        summary["exports_verified"] = {k: verify[k] for k in ("ppl_torch", "ppl_llama_cpp", "passed")}
        summary["exports_verified"].update(evaluate.general_figures(verify.get("general")))
        metrics["export.ppl_llama_cpp"] = verify["ppl_llama_cpp"]
        metrics.update({f"export.{k}": v for k, v in evaluate.general_figures(verify.get("general")).items()})
    if "speed" in report:
        speed = report["speed"]
        summary["speed"] = {
            "runtime": "llama.cpp",
            "threads": config.speed.threads,
            "decode_tokens_per_s": speed["artifact"]["decode_tokens_per_s"],
            "prefill_tokens_per_s": speed["artifact"]["prefill_tokens_per_s"],
            **{k: v for k, v in speed.items() if k.endswith("x_dense_f16")},
            **({"dense_f16_bytes": speed["dense_f16"]["bytes"]} if "dense_f16" in speed else {}),
        }
        metrics.update({f"export.{k}": v for k, v in summary["speed"].items() if isinstance(v, float)})
    for f in report["files"].values():
        metrics[f"export.{f['format']}_bytes"] = f["bytes"]
    return report, summary, metrics
