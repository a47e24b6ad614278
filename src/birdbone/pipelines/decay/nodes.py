"""Decay nodes: thin adapters from Kedro datasets and parameters to ``birdbone.core.waves``.

Each wave reads the previous wave's directory (``wave_<k-1>.state``) and its own
(``wave_<k>.resume``); when its own holds the state this run would produce (same chained
id), the wave is finished and every node passes the handle through without loading a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from birdbone.config import DecayConfig, HealConfig, QuantizeConfig, RegrowConfig, validate_recipe
from birdbone.core import cluster_decay, evaluate, modeling, plots, recovery, structure, waves
from birdbone.core.heal import check_heal
from birdbone.core.io import sha256_json
from birdbone.core.prune.structured import compact_
from birdbone.core.quantize import check_quantize
from birdbone.datasets import ModelRef, WaveHandle, weights_digest
from birdbone.pipelines import runtime
from birdbone.pipelines.heal.nodes import heal_series, heal_teacher_for

log = logging.getLogger(__name__)

DECISION_CODES = {"start": 0, "kept": 0, "strike": 1, "rolling back": 2, "reverted": 3, "skipped": 4}


def _decay_hash(decay: dict[str, Any], heal: dict[str, Any], regrow: dict[str, Any]) -> str:
    """What a wave's result depends on besides its parent: the decay, healing and regrowth
    settings (validated, defaults filled in)."""
    return sha256_json(
        {
            "decay": DecayConfig.model_validate(decay).model_dump(mode="json"),
            "heal": HealConfig.model_validate(heal).model_dump(mode="json"),
            "regrow": RegrowConfig.model_validate(regrow).model_dump(mode="json"),
        }
    )


def cache_teacher(
    bundle: modeling.ModelBundle, blocks: dict[str, torch.Tensor], decay: dict[str, Any], run: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The dense model's top-k next-token log-probabilities on the validation split, once."""
    config = DecayConfig.model_validate(decay)
    device = runtime(run)
    return evaluate.teacher_topk(
        bundle.model.to(device), blocks["validation"], config.gate.kl_top_k, config.batch_size, device
    )


def start_decay(
    bundle: modeling.ModelBundle,
    quality: dict[str, Any],
    blocks: dict[str, torch.Tensor],
    resume: WaveHandle | None,
    decay: dict[str, Any],
    heal: dict[str, Any],
    regrow: dict[str, Any],
    quantize: dict[str, Any] | None = None,
) -> waves.WaveState | WaveHandle:
    """Wave 0: the dense model, with the gate's reference at its validation perplexity.
    Healing and quantization settings that cannot fit the model fail here, before any wave."""
    origin = sha256_json(
        {
            "model": weights_digest(bundle),
            "blocks": {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in sorted(blocks.items())},
            "decay": _decay_hash(decay, heal, regrow),
        }
    )[:16]
    heal_config = HealConfig.model_validate(heal)
    if heal_config.enabled:
        check_heal(bundle, heal_config)
    if quantize is not None:
        quantize_config = QuantizeConfig.model_validate(quantize)
        if quantize_config.enabled:
            check_quantize(bundle, quantize_config)  # a group that does not divide a layer fails before wave 1
    if resume is not None and resume.state_id == origin:
        return resume
    dense = {"ppl": quality["validation"]["ppl"], "kl": 0.0}
    if "general" in quality:
        dense["general"] = {key: quality["general"][key] for key in ("ppl", "kl", "top1")}
    state = waves.start(bundle, dense, origin)
    if bundle.path is not None:
        state.current["model_from"] = bundle.path  # wave 0 is the baseline model: link its files
    return state


def decay_wave(
    previous: WaveHandle,
    resume: WaveHandle | None,
    blocks: dict[str, torch.Tensor],
    profile: dict[str, torch.Tensor],
    decay: dict[str, Any],
    heal: dict[str, Any],
    regrow: dict[str, Any],
    run: dict[str, Any],
) -> waves.WaveState | WaveHandle:
    """Prunes this wave's share (or restores a share of a rollback, or skips)."""
    wave = previous.info["wave"] + 1
    expected = waves.chain_id(previous.state_id, _decay_hash(decay, heal, regrow), wave)
    if resume is not None and resume.state_id == expected:
        return resume
    config = DecayConfig.model_validate(decay)
    calibration = blocks["calibration"][: config.calibration_blocks]
    importance = {k.removesuffix(".input_norm") + ".weight": v for k, v in profile.items() if k.endswith(".input_norm")}
    device = runtime(run)
    state = previous.state()
    state.bundle.model.to(device)
    clustered = None
    if config.clusters.enabled or HealConfig.model_validate(heal).bundles.enabled:
        blocks_count = len(state.bundle.adapter.blocks(state.bundle.model))
        clustered = cluster_decay.from_profile(profile, state.bundle.adapter, blocks_count)
    state = waves.decay(state, wave, config, calibration, importance or None, device, clustered)
    if state.current["action"] == "skip":
        state.current["model_from"] = previous.path  # the same model: link the previous wave's files
    return state


def regrow_wave(
    state: waves.WaveState | WaveHandle, blocks: dict[str, torch.Tensor], regrow: dict[str, Any], run: dict[str, Any]
) -> waves.WaveState | WaveHandle:
    """RigL regrowth after the wave's healing, at constant density."""
    if isinstance(state, WaveHandle):
        return state
    return waves.regrow(state, RegrowConfig.model_validate(regrow), blocks["healing"], runtime(run))


def evaluate_wave(
    state: waves.WaveState | WaveHandle,
    blocks: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    general: dict[str, torch.Tensor],
    decay: dict[str, Any],
    run: dict[str, Any],
) -> waves.WaveState | WaveHandle:
    """Validation perplexity and KL to the dense model; perplexity, KL and top-1 agreement
    on the general split."""
    if isinstance(state, WaveHandle):
        return state
    batch = DecayConfig.model_validate(decay).batch_size
    return waves.evaluate_state(state, blocks["validation"], teacher, batch, runtime(run), general or None)


def recover_wave(
    state: waves.WaveState | WaveHandle,
    blocks: dict[str, torch.Tensor],
    teacher: dict[str, torch.Tensor],
    heal_teacher: dict[str, torch.Tensor],
    dense: ModelRef,
    general: dict[str, torch.Tensor],
    decay: dict[str, Any],
    heal: dict[str, Any],
    run: dict[str, Any],
) -> waves.WaveState | WaveHandle:
    """The recovery ladder, when the wave spiked and ``decay.recovery`` is on."""
    if isinstance(state, WaveHandle):
        return state
    config = DecayConfig.model_validate(decay)
    if not config.recovery.enabled:
        return state
    heal_config = HealConfig.model_validate(heal)
    return recovery.recover(
        state,
        config,
        heal_config,
        len(config.wave_targets()),
        blocks["healing"],
        heal_teacher_for(heal_config, heal_teacher, dense),
        blocks["validation"],
        teacher,
        runtime(run),
        general or None,
    )


def gate_wave(
    state: waves.WaveState | WaveHandle, decay: dict[str, Any], heal: dict[str, Any], regrow: dict[str, Any]
) -> tuple[waves.WaveState | WaveHandle, dict[str, Any]]:
    """The stop-loss decision, and the wave's numbers for MLflow (one step per wave)."""
    if isinstance(state, WaveHandle):
        row = state.info["rows"][-1]
    else:
        state = waves.gate(state, DecayConfig.model_validate(decay), _decay_hash(decay, heal, regrow))
        row = state.rows[-1]
    return state, wave_metrics(row)


def wave_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """One wave's row as MLflow metrics of the run at step ``wave`` (the curves across
    waves), and as a nested run ``wave <k>`` of its own: the same figures, its decision and
    reason as tags, its healing curve by step."""
    numbers = {
        "wave.target_sparsity": row["target_sparsity"],
        "wave.sparsity": row["sparsity"],
        "wave.ppl": row["ppl"],
        "wave.kl": row["kl"],
        **{f"wave.{k}_general": v for k, v in (row.get("general") or {}).items()},
        "wave.params": row["params"],
        "wave.decision_code": DECISION_CODES[row["decision"]],
        "wave.seconds": sum(row.get("seconds", {}).values()),
        **cluster_metrics(row),
    }
    tags = {
        "birdbone.wave": str(row["wave"]),
        "decision": row["decision"],
        "reason": row["reason"],
        **({"recovery": json.dumps(row["recovery"])} if row.get("recovery") else {}),
    }
    return {
        "step": row["wave"],
        **numbers,
        "child": {
            "name": f"wave {row['wave']:02d}",
            "metrics": numbers,
            "tags": tags,
            "series": heal_series("heal", row.get("heal")),
        },
    }


def cluster_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A wave's cluster shares and recovery steps as MLflow metrics (absent when off)."""
    metrics: dict[str, float] = {}
    clusters = row.get("clusters")
    if clusters:
        factors = [v for f in clusters["factors"].values() for v in f]
        metrics.update({"wave.clusters.factor_min": min(factors), "wave.clusters.factor_max": max(factors)})
        metrics["wave.clusters.spiked"] = sum(len(c) for c in clusters.get("spiked", {}).values())
    if row.get("recovery"):
        metrics["wave.recovery.steps"] = len([s for s in row["recovery"] if "seconds" in s])
        metrics["wave.recovery.seconds"] = sum(s.get("seconds", 0.0) for s in row["recovery"])
    return metrics


def compact_decay(
    last: WaveHandle, quality: dict[str, Any], blocks: dict[str, torch.Tensor], general: dict[str, torch.Tensor]
) -> modeling.ModelBundle:
    """The decayed model with its masked units removed physically (channels, heads,
    blocks): smaller tensors, the same outputs. What stays masked (unstructured or N:M
    sparsity) travels with it as its masks. A decay the gate undid whole is the dense
    model bit for bit: it carries the baseline's quality (``quality``), so the next stages
    measure it no second time."""
    state = last.state()
    before = evaluate.parameter_count(state.bundle.model)
    at_dense = waves.back_at_dense(state)
    masks, info = compact_(state.bundle, state.masks)
    bundle = state.bundle
    bundle.masks = masks
    bundle.origin = {**bundle.origin, "decay_state": last.state_id, "wave": state.wave}
    if at_dense:
        key = evaluate.quality_key(blocks, general or None)
        bundle.origin["quality"] = {"key": key, "figures": evaluate.baseline_figures(quality)}
        log.info("the gate undid every wave: the decayed model is the dense model")
    log.info(
        "compacted the decayed model: %d -> %d parameters, %d blocks removed",
        before,
        info["params_after"],
        len(info["blocks_removed"]),
    )
    return bundle


def report_decay(
    last: WaveHandle,
    decayed: modeling.ModelBundle,
    blocks: dict[str, torch.Tensor],
    general: dict[str, torch.Tensor],
    parameters: dict[str, Any],
    run: dict[str, Any],
) -> tuple[dict[str, Any], Figure, dict[str, Any], dict[str, Any]]:
    """The wave table, the decay curve, ``summary.json``'s ``waves`` and ``final``, and
    the final numbers for tracking. The final model is the compacted one (``models/decayed``),
    measured on the test and general splits as it is stored."""
    recipe = validate_recipe(parameters, Path.cwd())
    assert recipe.decay is not None
    rows, gate = last.info["rows"], last.info["gate"]
    device = runtime(run)
    model = decayed.model.to(device)
    carried = evaluate.carried_quality(decayed, evaluate.quality_key(blocks, general or None))
    if carried is not None:  # the dense model, measured by the baseline
        test = {"ppl": carried["ppl_test"]}
        general_quality = {k: carried[f"{k}_general"] for k in ("ppl", "kl", "top1") if f"{k}_general" in carried}
        general_quality = general_quality or None
    else:
        test = evaluate.perplexity(model, blocks["test"], recipe.decay.batch_size, device, "final test")
        general_quality = evaluate.general_quality(model, general, recipe.decay.batch_size, device, "final general")
    assert decayed.path is not None
    masks = decayed.masks
    params = evaluate.parameter_count(model)
    masked = sum(masks.numel(n) - masks.kept(n) for n in masks) if masks is not None else 0
    final = {
        "path": os.path.relpath(decayed.path, Path.cwd()),
        "wave_path": os.path.relpath(last.path, Path.cwd()),
        "ppl_test": test["ppl"],
        "ppl_val": rows[-1].get("state_ppl", rows[-1]["ppl"]),
        **evaluate.general_figures(general_quality),
        "sparsity": rows[-1]["sparsity"],
        "params": params,
        "params_dense": rows[0]["params"],
        "nonzero_params": params - masked,
        "shapes": structure.layer_shapes(decayed.model, decayed.adapter),
        "bytes": sum(p.stat().st_size for p in Path(decayed.path).glob("model*.safetensors")),
        "stop_reason": gate.get("stop_reason"),
    }
    report = {
        "recipe_hash": recipe.hash(),
        "decay": recipe.decay.model_dump(mode="json"),
        "waves": rows,
        "final": final,
    }
    summary = {
        "recipe_hash": recipe.hash(),
        "waves": [
            {
                "index": r["wave"],
                "target_sparsity": r["target_sparsity"],
                "sparsity": r["sparsity"],
                "ppl": r["ppl"],
                "kl": r["kl"],
                **evaluate.general_figures(r.get("general")),
                "decision": r["decision"],
                "reason": r["reason"],
            }
            for r in rows
        ],
        "final": {
            k: final[k] for k in ("ppl_test", *evaluate.general_figures(general_quality), "sparsity", "params", "bytes")
        },
    }
    log.info("decay waves:\n%s", wave_table(rows))
    metrics = {f"final.{k}": v for k, v in final.items() if isinstance(v, int | float)}
    return report, plots.decay_figure(rows, gate["dense_ppl"]), summary, metrics


def unit_target(pattern: dict[str, Any]) -> str:
    """A structured wave's target in its units, e.g. ``mlp_channels 0.125``, ``blocks 2``."""
    amount = pattern["count"] if pattern["kind"] == "blocks" else f"{pattern['ratio']:.4g}"
    return f"{pattern['kind']} {amount}"


def wave_table(rows: list[dict[str, Any]]) -> str:
    """The waves as a Markdown table (logged at the end of the run, pasted into notes)."""
    lines = [
        "| wave | target | sparsity | val ppl | KL | general ppl | general KL | decision | reason |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        target = "-" if r["target_sparsity"] is None else f"{r['target_sparsity']:.4f}"
        if "target_units" in r:
            target = unit_target(r["target_units"])
        general = r.get("general") or {}
        general_ppl = f"{general['ppl']:.3f}" if general else "-"
        general_kl = f"{general['kl']:.4f}" if general else "-"
        lines.append(
            f"| {r['wave']} | {target} | {r['sparsity']:.4f} | {r['ppl']:.3f} | {r['kl']:.4f} | {general_ppl} | "
            f"{general_kl} | {r['decision']} | {r['reason']} |"
        )
    return "\n".join(lines)
