"""The decay waves end to end on the tiny test model (killing and resuming: tests/reliability)."""

import json
from pathlib import Path

import pytest

from birdbone.core import modeling
from birdbone.core.masks import MaskSet
from birdbone.errors import ConfigError
from tests.test_pipeline import mlflow_runs, run


def test_waves_write_models_masks_table_plot_and_mlflow_steps(project):
    run(project)
    waves_dir = project / "models/waves"
    assert sorted(p.name for p in waves_dir.iterdir()) == [f"wave_{k}" for k in range(8)]  # 4 waves + 3 rollback
    report = json.loads((project / "data/08_reporting/decay.json").read_text())
    rows = report["waves"]
    assert [r["wave"] for r in rows] == list(range(8))
    assert [r["target_sparsity"] for r in rows[1:5]] == pytest.approx([0.2, 0.36, 0.488, 0.5])
    for row in rows[1:]:
        assert row["decision"] in {"kept", "strike", "rolling back", "reverted", "skipped"} and row["reason"]
    summary = json.loads((project / "data/08_reporting/summary.json").read_text())
    assert {"baseline", "waves", "final"} <= set(summary)
    assert set(summary["final"]) >= {"ppl_test", "sparsity", "params", "bytes"}
    assert summary["waves"][0]["decision"] == "start" and "kl" in summary["waves"][1]
    assert (project / "data/08_reporting/decay.png").read_bytes()[:4] == b"\x89PNG"
    last = modeling.load_model_dir(waves_dir / "wave_7")  # every wave is a loadable model directory
    masks = MaskSet.load(waves_dir / "wave_7/masks.safetensors")
    masks_sparsity = masks.overall_sparsity()
    assert masks_sparsity == pytest.approx(summary["final"]["sparsity"])
    weights = {f"{n}.weight": m.weight for n, m in last.adapter.linears(last.model).items()}
    for name, mask in masks.items():
        assert bool((weights[name][~mask] == 0).all()), name
    runs = mlflow_runs(project)
    assert list(runs["status"]) == ["FINISHED"]
    import mlflow

    history = mlflow.tracking.MlflowClient().get_metric_history(runs["run_id"][0], "wave.ppl")
    assert sorted(m.step for m in history) == list(range(1, 8))
    waves = mlflow_runs(project, children_of=runs["run_id"][0])  # a nested run per wave, in order
    assert list(waves["tags.mlflow.runName"]) == [f"wave {k:02d}" for k in range(1, 8)]
    assert list(waves["tags.decision"]) == [r["decision"] for r in rows[1:]]
    assert list(waves["tags.reason"]) == [r["reason"] for r in rows[1:]]
    assert list(waves["metrics.wave.ppl"]) == pytest.approx([r["ppl"] for r in rows[1:]])
    assert set(waves["status"]) == {"FINISHED"}
    first_heal = mlflow.tracking.MlflowClient().get_metric_history(waves["run_id"][0], "heal.loss")
    assert sorted(m.step for m in first_heal) == [1, 2, 3, 4]  # wave 1's healing curve, by step
    assert not [k for k in runs.columns if k.startswith("tags.wave.")]  # no flat per-wave tags on the run
    assert runs["metrics.final.ppl_test"][0] == pytest.approx(summary["final"]["ppl_test"])
    # healing: in every wave that pruned (tapered steps), and once more at the end, masks kept
    healed_rows = [r for r in rows if r.get("heal")]
    assert healed_rows and all(r["heal"]["merged"] for r in healed_rows)
    assert [r["heal"]["steps"] for r in healed_rows[:2]] == [4, 3]  # E_k = E_1 (1 - (k-1)/R), R = 4
    heal = json.loads((project / "data/08_reporting/heal.json").read_text())
    assert heal["final"]["steps"] == 4 and heal["final"]["merged"] and heal["final"]["curve"]
    assert summary["heal"]["final"]["ppl_test"] > 0
    assert (project / "data/08_reporting/heal.png").read_bytes()[:4] == b"\x89PNG"
    healed = modeling.load_model_dir(project / "models/healed")
    healed_masks = MaskSet.load(project / "models/healed/masks.safetensors")
    assert healed_masks.equals(masks)
    assert MaskSet.from_weights(
        {f"{n}.weight": m.weight for n, m in healed.adapter.linears(healed.model).items()}
    ).overall_sparsity() == pytest.approx(masks_sparsity, abs=1e-6)
    final_curve = mlflow.tracking.MlflowClient().get_metric_history(runs["run_id"][0], "heal.final.loss")
    assert sorted(m.step for m in final_curve) == [1, 2, 3, 4]
    decayed = modeling.load_model_dir(project / "models/decayed")  # unstructured: same shapes, masks kept
    assert MaskSet.load(project / "models/decayed/masks.safetensors").equals(masks)
    assert sum(p.numel() for p in decayed.model.parameters()) == summary["final"]["params"]


def test_structured_waves_end_in_a_compacted_model_that_computes_the_same(project):
    import torch
    import yaml

    from birdbone.datasets import ModelDataset

    path = project / "conf/test/parameters_decay.yml"
    params = yaml.safe_load(path.read_text())
    params["decay"]["pattern"] = {"kind": "mlp_channels", "ratio": 0.25, "multiple": 16}
    params["decay"]["gate"]["budget"] = None  # a random model's perplexity moves freely: keep every wave
    params["decay"]["gate"]["step_limit"] = 100.0
    path.write_text(yaml.safe_dump(params))
    run(project)
    report = json.loads((project / "data/08_reporting/decay.json").read_text())
    rows, final = report["waves"], report["final"]
    assert [r["decision"] for r in rows[1:3]] == ["kept", "kept"]
    assert [r["target_units"]["ratio"] for r in rows[1:3]] == [0.125, 0.25]
    decayed = ModelDataset("models/decayed").load()
    assert [s["intermediate_size"] for s in final["shapes"]] == [96, 96]
    assert decayed.model.model.layers[0].mlp.down_proj.weight.shape == (64, 96)
    assert final["params"] == rows[-1]["params"] == final["params_dense"] - 2 * 32 * 3 * 64
    assert decayed.masks is not None and decayed.masks.overall_sparsity() == 0.0
    wave = modeling.load_model_dir(Path(final["wave_path"]))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = wave.model(ids, use_cache=False).logits
        assert torch.allclose(decayed.model(ids, use_cache=False).logits, expected, atol=1e-5)


def test_a_wave_config_that_cannot_reach_its_target_is_named(project):
    with pytest.raises(ConfigError, match=r"decay = .*above the cap 20%\. Fix: at least 4 waves"):
        run(project, decay={"waves": 2})


def test_cluster_aware_waves_heal_by_bundles_and_climb_the_recovery_ladder(project):
    run(
        project,
        profile={"clusters": {"enabled": True, "count": 4, "dims": 8}},
        decay={"clusters": {"enabled": True}, "recovery": {"enabled": True}, "gate": {"kl_limit": 1e-6}},
        heal={"bundles": {"enabled": True, "count": 2}},
        quantize={"enabled": False},
        export={"enabled": False},
    )
    rows = json.loads((project / "data/08_reporting/decay.json").read_text())["waves"]
    pruned = [r for r in rows[1:] if r.get("clusters")]
    assert pruned and all(set(r["clusters"]) == {"factors", "sensitivity", "spiked"} for r in pruned)
    healed = [r["heal"] for r in rows[1:] if r.get("heal")]
    assert healed and all(len(h["bundles"]) == 2 for h in healed)
    assert all(h["steps"] == sum(b["steps"] for b in h["bundles"]) for h in healed)
    # no step brings the KL under 1e-6: the whole ladder runs, the revert goes back to dense, the decay stops
    steps = rows[1]["recovery"]
    assert [s["step"] for s in steps] == ["heal", "regrow", "rollback", "revert"]
    assert all({"ppl", "kl", "sparsity", "seconds", "outcome"} <= set(s) for s in steps)
    assert steps[0]["sparsity"] > steps[1]["sparsity"] > steps[2]["sparsity"] > steps[3]["sparsity"] == 0.0
    assert set(steps[1]["clusters"]) == {"0", "1"}  # regrowth in each block's spiking cluster
    assert steps[3]["ppl"] == rows[0]["ppl"] and steps[3]["outcome"] == "reverted"
    assert rows[1]["decision"] == "reverted" and "recovery ladder reverted" in rows[1]["reason"]
    assert json.loads((project / "data/08_reporting/decay.json").read_text())["final"]["stop_reason"] == "recovery"
    runs = mlflow_runs(project)
    assert {"metrics.wave.clusters.factor_min", "metrics.wave.recovery.steps"} <= set(runs.columns)


def test_without_decay_the_dense_model_is_healed_against_the_quantize_grids_then_exported(project):
    run(
        project,
        decay={"enabled": False},
        heal={"final": {"steps": 2, "fake_quant": True}},
        quantize={"method": "rtn", "lowrank": {"correction_rank": 0}},
    )
    assert not (project / "models/waves").exists() and not (project / "models/decayed").exists()
    summary = json.loads((project / "data/08_reporting/summary.json").read_text())
    heal = summary["heal"]
    assert heal["waves"] == [] and heal["final"]["steps"] == 2 and heal["final"]["merged"]
    assert heal["final"]["ppl_general_before"] == pytest.approx(summary["baseline"]["ppl_general"], rel=1e-4)
    origin = json.loads((project / "models/healed/birdbone.json").read_text())["origin"]
    assert origin["heal"] == "final, fake-quant"
    assert origin["quality"]["figures"]["ppl_test"] == heal["final"]["ppl_test"]
    assert summary["quantize"]["ppl_test_before"] == pytest.approx(heal["final"]["ppl_test"])  # quantize read it
    assert summary["exports_verified"]["passed"] and summary["exports_verified"]["ppl_general"] > 0
    timeline = summary["timeline"]["stage_seconds"]
    assert "decay" not in timeline and {"baseline", "heal", "quantize", "export"} <= set(timeline)
