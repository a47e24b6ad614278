"""The whole baseline pipeline on the tiny test model, in a throwaway copy of the project."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from kedro.framework.session import KedroSession
from kedro.framework.startup import bootstrap_project

from birdbone.errors import ConfigError, TextSourceError


def run(project: Path, **extra_params):
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="test", runtime_params=extra_params or None) as session:
        session.run()


def mlflow_runs(project: Path, children_of: str | None = None):
    """The project's ``kedro run`` runs (top level), or the nested runs of one of them."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["birdbone"], order_by=["attributes.run_name ASC"])
    parents = runs.get("tags.mlflow.parentRunId")
    if parents is None:
        return runs if children_of is None else runs.iloc[0:0]
    chosen = parents.isna() if children_of is None else parents == children_of
    return runs[chosen].reset_index(drop=True)


def test_test_env_writes_summary_report_plot_and_an_mlflow_run(project, caplog):
    caplog.set_level("INFO")
    run(project)
    summary = json.loads((project / "data/08_reporting/summary.json").read_text())
    assert set(summary) >= {"model", "recipe_hash", "baseline"}
    base = summary["baseline"]
    assert set(base) >= {"ppl_val", "ppl_test", "params", "bytes", "tokens_per_s"}
    assert 100 < base["ppl_val"] < 2000  # random 512-token model: about the vocabulary size
    assert base["params"] > 100_000 and base["bytes"] > 4 * base["params"] * 0.9
    assert base["tasks"]["general_mc"]["n"] == 32
    assert (project / "data/08_reporting/baseline.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((project / "data/08_reporting/baseline.json").read_text())
    assert len(report["spectra"]) == 2 * 7 + 1
    sidecar = json.loads((project / "models/baseline/birdbone.json").read_text())
    assert sidecar["origin"]["source"]["kind"] == "tiny" and "model.safetensors" in sidecar["sha256"]
    profile = json.loads((project / "data/04_feature/profile.json").read_text())
    assert len(profile["block_influence"]) == 2 and profile["calibration_blocks"] == 8
    assert (project / "data/08_reporting/profile.png").read_bytes()[:4] == b"\x89PNG"
    from safetensors.torch import load_file

    tensors = load_file(project / "data/04_feature/profile.safetensors")
    assert tensors["model.layers.1.mlp.down_proj.gram"].shape == (128, 128)
    assert tensors["model.layers.0.self_attn.o_proj.weight.grad_abs"].shape == (64, 64)
    runs = mlflow_runs(project)
    assert list(runs["status"]) == ["FINISHED"]
    assert runs["metrics.baseline.ppl_val"][0] == pytest.approx(base["ppl_val"])
    assert runs["metrics.profile.block_influence.1"][0] == pytest.approx(profile["block_influence"][1])
    assert runs["params.data.block_size"][0] == "64"
    assert not list(project.rglob(".tmp-*"))
    quantized = summary["quantize"]
    assert quantized["method"] == "gptq" and quantized["avg_bits"] == 4.5  # Q4_0: 4 bits + a float16 scale per 32
    assert runs["metrics.quantize.ppl_test"][0] == pytest.approx(quantized["ppl_test"])
    assert (project / "data/08_reporting/quantize.png").read_bytes()[:4] == b"\x89PNG"
    # the export: a GGUF llama.cpp reads back at the torch model's perplexity, an HF directory transformers loads
    exports = {e["format"]: e for e in summary["exports"]}
    assert exports["gguf"]["path"] == "models/export/model.gguf" and (project / "models/export/model.gguf").is_file()
    assert exports["gguf"]["bytes"] == (project / "models/export/model.gguf").stat().st_size
    assert exports["safetensors"]["loads_in"] == "transformers"
    assert summary["exports_verified"]["passed"]
    assert summary["speed"]["runtime"] == "llama.cpp" and summary["speed"]["decode_x_dense_f16"] > 0
    export = json.loads((project / "data/08_reporting/export.json").read_text())
    assert abs(export["verify"]["relative_difference"]) <= 0.01
    assert export["files"]["gguf"]["types"]["Q4_0"] == 2 * 7 + 2  # the quantized head and embedding too
    assert export["files"]["gguf"]["embedding"] == "Q4_0"
    assert export["files"]["safetensors"]["check"]["same_top_token"] > 0.95
    assert export["files"]["pack"]["lossless"] and export["files"]["pack"]["strategies"]["quantized"] == 2 * 7 + 2
    assert runs["metrics.export.ppl_llama_cpp"][0] == pytest.approx(export["verify"]["ppl_llama_cpp"])
    # every stage measured on the general split too (text the dense model wrote; no stage trains on it)
    assert base["ppl_general"] > 0 and runs["metrics.baseline.ppl_general"][0] == pytest.approx(base["ppl_general"])
    start = summary["waves"][0]
    assert (start["ppl_general"], start["kl_general"], start["top1_general"]) == (base["ppl_general"], 0.0, 1.0)
    assert all(w["ppl_general"] > 0 for w in summary["waves"])
    verified = summary["exports_verified"]
    for section in (summary["final"], summary["heal"]["final"], quantized, verified):
        assert section["ppl_general"] > 0 and section["kl_general"] >= 0 and 0 <= section["top1_general"] <= 1
    assert summary["heal"]["final"]["ppl_general_before"] == pytest.approx(summary["final"]["ppl_general"])
    assert verified["ppl_general"] == pytest.approx(quantized["ppl_general"], rel=0.01)  # llama.cpp = torch
    for key in ("export.ppl_general", "export.kl_general", "quantize.top1_general", "heal.final.ppl_general"):
        assert runs[f"metrics.{key}"][0] > 0, key
    assert runs["metrics.wave.ppl_general"][0] > 0
    # each stage's peak memory, in summary.json and MLflow
    memory = summary["memory"]
    assert set(memory) == {"baseline", "profile", "decay", "heal", "quantize", "export"}
    assert all(100 < m["peak_rss_mb"] < 24 * 1024 and m["per_stage"] for m in memory.values())
    assert runs["metrics.memory.heal.peak_rss_mb"][0] == pytest.approx(memory["heal"]["peak_rss_mb"])
    # the run as MLflow users expect it: named by what ran, a model-development experiment,
    # the text as dataset inputs, the reports and the exported model as artifacts
    import mlflow

    client = mlflow.tracking.MlflowClient()
    assert runs["tags.mlflow.runName"][0] == "all stages (test)"
    assert client.get_experiment_by_name("birdbone").tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = client.get_run(runs["run_id"][0]).inputs.dataset_inputs
    assert [(i.dataset.name, i.tags[0].value) for i in inputs] == [("pydoc_topics", "text")]
    artifacts = {a.path for a in client.list_artifacts(runs["run_id"][0])}
    assert {"summary.json", "decay.json", "export.json", "timeline.png", "model"} <= artifacts
    model = {a.path for a in client.list_artifacts(runs["run_id"][0], "model")}
    assert model == {"model/model.gguf", "model/hf"}
    # the run ends with its answer: what it made (the GGUF first), how good against dense, how fast, where to look
    closing = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("bird-bone: done in"))
    lines = closing.splitlines()
    assert lines[1].split()[:3] == ["models/export/model.gguf", f"{exports['gguf']['bytes'] / 1e6:.1f}", "MB"]
    assert any(line.split()[0] == "models/quantized/" for line in lines)
    in_domain = f"{verified['ppl_llama_cpp']:.2f} (dense {base['ppl_test']:.2f}"
    assert f"in-domain perplexity (export in llama.cpp): {in_domain}" in closing
    assert f"general perplexity   (export in llama.cpp): {verified['ppl_general']:.2f} (dense" in closing
    assert f"llama.cpp decode: {summary['speed']['decode_x_dense_f16']:.2f}x dense F16" in closing
    assert "waves: wave 1 " in closing and f"/runs/{runs['run_id'][0]}" in closing


def test_the_quantized_model_keeps_the_masks_and_every_weight_is_on_its_grid(project):
    run(project)
    from birdbone.core import quantize
    from birdbone.datasets import ModelDataset

    healed = ModelDataset(str(project / "models/healed")).load()
    bundle = ModelDataset(str(project / "models/quantized")).load()
    assert bundle.masks.equals(healed.masks) and bundle.masks.overall_sparsity() > 0.3
    weights = {f"{n}.weight": lin.weight.data for n, lin in bundle.adapter.linears(bundle.model).items()}
    heads = {
        "lm_head.weight": bundle.model.lm_head.weight,
        "model.embed_tokens.weight": bundle.model.model.embed_tokens.weight,
    }
    assert set(bundle.quant.scales) == set(weights) | set(heads)  # quantize.head in the test conf
    for name, w in heads.items():
        quantize.codes(w, bundle.quant.scales[name], bundle.quant.grid_of(name))
    for name, w in weights.items():
        keep = bundle.masks[name]
        assert torch.all(w[~keep] == 0), name
        grid = bundle.quant.grid_of(name)
        assert grid == quantize.Grid(4, 32, True)
        quantize.codes(w, bundle.quant.scales[name], grid, keep)  # raises if a weight is off its grid
    # the rank-2 corrections of the quantization error: a peft adapter beside the quantized weights
    assert set(bundle.quant.corrections) == set(weights)
    assert all(b.shape[1] == a.shape[0] == 2 for b, a in bundle.quant.corrections.values())
    from peft import PeftModel

    served = PeftModel.from_pretrained(bundle.model, str(project / "models/quantized/adapter"))
    assert sum("lora_A" in n for n, _ in served.named_parameters()) == len(weights)
    final = json.loads((project / "data/08_reporting/quantize.json").read_text())["final"]
    assert final["correction_rank"] == 2 and final["ppl_test_without_correction"] > 0
    assert final["avg_bits_with_correction"] > final["avg_bits"]
    assert final["factorizable"]["pruned_kept_sparse"] == len(weights)  # every layer was pruned: none factorized


def test_a_fake_quant_final_heal_then_round_to_nearest_keeps_masks_and_grid(project):
    run(project, heal={"final": {"fake_quant": True}}, quantize={"method": "rtn", "lowrank": {"correction_rank": 0}})
    from birdbone.core import quantize
    from birdbone.datasets import ModelDataset

    healed = ModelDataset(str(project / "models/healed")).load()
    assert healed.origin["heal"] == "final, fake-quant"
    bundle = ModelDataset(str(project / "models/quantized")).load()
    assert bundle.masks.equals(healed.masks)
    for name, linear in bundle.adapter.linears(bundle.model).items():
        key = f"{name}.weight"
        quantize.codes(linear.weight.data, bundle.quant.scales[key], bundle.quant.grid_of(key), bundle.masks[key])
    heal_report = json.loads((project / "data/08_reporting/heal.json").read_text())
    assert heal_report["final"]["merged"] and heal_report["config"]["final"]["fake_quant"]


def test_mixed_precision_keeps_the_grids_the_fake_quant_heal_trained_against(project):
    mixed = {"enabled": True, "avg_bits": 6.0, "levels": [8, 4], "group": 32, "stress": {"blocks": 0}}
    run(
        project,
        heal={"final": {"fake_quant": True}},
        quantize={"method": "rtn", "mixed": mixed, "lowrank": {"correction_rank": 0}},
    )
    from birdbone.datasets import ModelDataset

    trained = ModelDataset(str(project / "models/healed")).load().quant
    assert trained is not None and not trained.scales  # the plan the heal trained against, no codes yet
    assert {g.bits for g in trained.grids.values()} == {8, 4}
    quantized = ModelDataset(str(project / "models/quantized")).load().quant
    heads = {"lm_head.weight", "model.embed_tokens.weight"}  # quantize.head in the test conf, not trained against
    assert {n: g for n, g in quantized.grids.items() if n not in heads} == trained.grids
    assert set(quantized.scales) == set(trained.grids) | heads


def test_same_recipe_same_numbers(project):
    run(project)
    first = json.loads((project / "data/08_reporting/summary.json").read_text())
    started = time.time()
    run(project)
    # MLflow gets what the second run wrote, not the reports the first one left
    import mlflow

    second_run = mlflow_runs(project).sort_values("start_time")["run_id"].iloc[-1]
    logged = {a.path for a in mlflow.tracking.MlflowClient().list_artifacts(second_run)}
    written = {p.name for p in (project / "data/08_reporting").glob("*") if p.stat().st_mtime >= started - 1}
    assert logged - {"model"} == {n for n in written if n.endswith((".json", ".png"))}
    assert "model" not in logged or (project / "models/export/model.gguf").stat().st_mtime >= started - 1
    second = json.loads((project / "data/08_reporting/summary.json").read_text())
    assert first["recipe_hash"] == second["recipe_hash"]
    assert first["baseline"]["ppl_test"] == second["baseline"]["ppl_test"]
    assert first["baseline"]["tasks"] == second["baseline"]["tasks"]


def test_failed_pipeline_marks_the_mlflow_run_failed(project):
    (project / "empty.txt").write_text("\n")  # passes the recipe check (the file exists), fails the first node
    with pytest.raises(TextSourceError):
        run(project, data={"sources": [{"kind": "txt", "path": "empty.txt"}]})
    runs = mlflow_runs(project)
    assert list(runs["status"]) == ["FAILED"]
    assert "TextSourceError" in runs["tags.birdbone.error"][0]


def test_a_malformed_task_file_fails_the_recipe_check(project):
    bad = project / "data/01_raw/tasks/canaries.jsonl"
    bad.write_text('{"prompt": "no expected key"}\n')
    with pytest.raises(ConfigError, match=r"canaries.jsonl:1 lacks \['expected'\]"):
        run(project)
    assert not (project / "data/03_primary").exists()


def test_bad_config_fails_before_any_model_is_loaded(project):
    with pytest.raises(ConfigError, match="data.block_size"):
        run(project, data={"block_size": 3})
    assert not (project / "models/baseline").exists()


def test_running_from_elsewhere_is_refused(project, monkeypatch, tmp_path_factory):
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    with pytest.raises(ConfigError, match="runs from the project root"):
        run(project)


def test_cli_reports_bad_config_with_the_fix(project):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    kedro = Path(sys.executable).parent / "kedro"
    out = subprocess.run(
        [str(kedro), "run", "--env", "test", "--params", "data.splits.test=0"],
        cwd=project,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "data.splits.test = 0" in text and "greater than 0" in text
    assert "telemetry" not in text.lower()


def test_a_quantize_group_that_does_not_divide_a_layer_fails_before_the_first_wave(project):
    from birdbone.errors import QuantizeError

    with pytest.raises(QuantizeError, match="q_proj.weight has 64 input columns, which groups of 48 do not divide"):
        run(project, quantize={"group": 48})
    assert not (project / "models/waves/wave_1").exists()


def test_generated_healing_text_is_mixed_in_cached_and_reused_by_the_next_run(project):
    import yaml

    from birdbone.config import DataConfig
    from birdbone.core import modeling
    from birdbone.core.data import build_blocks
    from birdbone.datasets import TensorsDataset

    text = yaml.safe_load((project / "conf/test/parameters_data.yml").read_text())["data"]
    generated = {"kind": "generated", "blocks": 12, "ratio": 0.5, "seed": 2, "batch_size": 4}
    sources = [*text["sources"], generated]
    bootstrap_project(project)
    runs = []
    for _ in range(2):
        with KedroSession.create(project_path=project, env="test", runtime_params={"data": {"sources": sources}}) as s:
            s.run(pipeline_name="baseline")
        runs.append(TensorsDataset(str(project / "data/03_primary/blocks.safetensors")).load())
    report = json.loads((project / "data/03_primary/blocks.json").read_text())["generated"]
    assert report["reused"] and report["calibration"] == 8 and report["healing"] == 4  # half of 16 calibration blocks
    summary = json.loads((project / "data/08_reporting/summary.json").read_text())["baseline"]["generated"]
    assert summary["key"] == report["key"] and summary["reused"]
    blocks = runs[1]
    assert all(torch.equal(blocks[k], runs[0][k]) for k in blocks)  # the second run read the first one's text
    cache = TensorsDataset(str(project / report["path"])).load()["blocks"]
    assert torch.equal(blocks["calibration"][1::2], cache[:8]) and torch.equal(blocks["healing"][1::2], cache[8:])
    user, _ = build_blocks(DataConfig.model_validate(text), modeling.tiny_tokenizer(512))
    assert torch.equal(blocks["test"], user["test"]) and torch.equal(blocks["validation"], user["validation"])
    assert torch.equal(blocks["calibration"][::2], user["calibration"][:8])
    general = TensorsDataset(str(project / "data/03_primary/general.safetensors")).load()["blocks"]
    assert not any(torch.equal(g, c) for g in general for c in cache)  # another seed: never the judged text


def test_live_distillation_runs_the_dense_model_beside_every_heal_and_caches_nothing(project):
    from birdbone.datasets import TensorsDataset

    run(project, heal={"distill_top_k": None})
    assert TensorsDataset(str(project / "data/04_feature/heal_teacher_topk.safetensors")).load() == {}
    heal = json.loads((project / "data/08_reporting/heal.json").read_text())
    assert heal["waves"] and all(wave["steps"] > 0 and not wave["stopped"] for wave in heal["waves"])
    assert heal["final"]["merged"] and all("kl" in point for point in heal["final"]["curve"] if "loss" in point)


def test_general_text_you_name_is_measured_after_the_blocks_the_model_wrote(project):
    from birdbone.datasets import TensorsDataset

    (project / "data/01_raw/wiki.txt").write_text("Rivers carry water from the hills down to the sea. " * 60)
    general = {"blocks": 4, "sources": [{"kind": "txt", "path": "data/01_raw/wiki.txt"}], "text_blocks": 3}
    bootstrap_project(project)
    with KedroSession.create(project_path=project, env="test", runtime_params={"data": {"general": general}}) as s:
        s.run(pipeline_name="baseline")
    split = TensorsDataset(str(project / "data/03_primary/general.safetensors")).load()
    assert split["blocks"].shape == (7, 64) and int(split["named_blocks"]) == 3
    assert split["index"].shape[0] == 7  # the dense model's predictions cover the named text too
    assert json.loads((project / "data/03_primary/blocks.json").read_text())["general_text_blocks"] == 3
    summary = json.loads((project / "data/08_reporting/baseline.json").read_text())
    assert summary["quality"]["general"]["tokens"] == 7 * 63
