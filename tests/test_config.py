"""Bad recipes fail before any compute, naming the key, the file that set it, and the fix."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from birdbone.config import Recipe, validate_recipe
from birdbone.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
GOOD = {
    "model": {"source": {"kind": "tiny"}},
    "data": {"sources": [{"kind": "pydoc_topics"}], "block_size": 64},
}


def conf(tmp_path: Path, files: dict[str, dict]) -> list[Path]:
    """Writes parameters files into tmp conf/base and returns [base]."""
    base = tmp_path / "conf" / "base"
    base.mkdir(parents=True)
    for name, content in files.items():
        (base / name).write_text(yaml.safe_dump(content))
    return [base]


def error_of(params: dict, tmp_path: Path | None = None, dirs: list[Path] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        validate_recipe(params, tmp_path, dirs)
    return str(err.value)


def merged(**overrides) -> dict:
    out = {k: dict(v) for k, v in GOOD.items()}
    for dotted, value in overrides.items():
        node = out
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def test_the_shipped_recipes_are_valid():
    import torch

    for env in ("base", "test", "structured", "gpu"):
        params: dict = {}
        for env_dir in ("base", env):
            for path in sorted((ROOT / "conf" / env_dir).glob("parameters*.yml")):
                params.update(yaml.safe_load(path.read_text()))
        if env == "gpu" and not torch.cuda.is_available():  # refused up front without CUDA
            assert "run.device = 'cuda'" in error_of(params, ROOT) and "no CUDA device" in error_of(params, ROOT)
            params["run"] = {**params["run"], "device": "auto"}  # QLoRA still needs CUDA
            assert "heal.quantize: nf4 (QLoRA) needs a CUDA device" in error_of(params, ROOT)
            continue
        assert isinstance(validate_recipe(params, ROOT), Recipe)


def test_unknown_key_names_file_and_suggests_the_near_miss(tmp_path):
    params = merged(data__blok_size=64)
    dirs = conf(tmp_path, {"parameters_data.yml": {"data": params["data"]}})
    message = error_of(params, tmp_path, dirs)
    assert "data.blok_size: unknown key" in message
    assert "conf/base/parameters_data.yml" in message
    assert "did you mean 'block_size'?" in message


def test_unknown_top_level_key_lists_the_stages(tmp_path):
    message = error_of({**GOOD, "decay_waves": {}}, tmp_path, conf(tmp_path, {"parameters_x.yml": {"decay_waves": {}}}))
    assert "decay_waves: unknown key" in message and "parameters_x.yml" in message
    assert (
        "did you mean 'decay'? known keys here: baseline, data, decay, export, heal, model, profile, quantize, "
        "regrow, run, tracking" in message
    )


def test_wrong_type_states_the_type(tmp_path):
    message = error_of(merged(data__block_size="big"))
    assert "data.block_size = 'big'" in message and "valid integer" in message and "Fix:" in message


def test_out_of_range_states_the_bound():
    message = error_of(merged(data__block_size=4))
    assert "data.block_size = 4" in message and "greater than or equal to 8" in message


def test_unknown_choice_lists_the_allowed_ones():
    message = error_of(merged(run={"device": "tpu"}))
    assert "run.device = 'tpu'" in message and "'cpu', 'cuda' or 'auto'" in message


def test_unknown_source_kind_lists_the_kinds():
    message = error_of(merged(model={"source": {"kind": "onnx"}}))
    assert "model.source" in message and "'default', 'hf_dir', 'gguf', 'hub', 'tiny'" in message


def test_missing_file_names_path_and_fix(tmp_path):
    message = error_of(merged(model={"source": {"kind": "gguf", "path": "models/nope.gguf"}}), tmp_path)
    assert (
        "model.source.path" in message and "'models/nope.gguf' does not exist" in message and "fix the path" in message
    )


def test_missing_directory_for_hf_dir(tmp_path):
    message = error_of(merged(model={"source": {"kind": "hf_dir", "path": "my_model"}}), tmp_path)
    assert "directory 'my_model' does not exist" in message


def test_missing_required_key_says_add_it(tmp_path):
    dirs = conf(tmp_path, {"parameters_model.yml": {"model": {"dtype": "float32"}}})
    message = error_of({"model": {"dtype": "float32"}, "data": GOOD["data"]}, tmp_path, dirs)
    assert (
        "model.source: required key is missing" in message and "parameters_model.yml" in message and "add it" in message
    )


def test_task_file_must_exist(tmp_path):
    message = error_of(merged(baseline={"tasks": [{"kind": "canary", "path": "nope.jsonl"}]}), tmp_path)
    assert "baseline.tasks.0.path" in message and "does not exist" in message


def test_tiny_model_shapes_are_checked():
    message = error_of(merged(model={"source": {"kind": "tiny", "heads": 4, "kv_heads": 3}}))
    assert "heads (4) must be a multiple of kv_heads (3)" in message


def test_every_problem_is_listed_at_once():
    message = error_of(merged(data__block_size=0, run={"seed": -1}))
    assert message.startswith("Invalid configuration (2 problems)")
    assert "data.block_size" in message and "run.seed" in message


def test_key_in_env_overrides_is_blamed_on_the_env_file(tmp_path):
    dirs = conf(tmp_path, {"parameters_data.yml": {"data": GOOD["data"]}})
    env = tmp_path / "conf" / "test"
    env.mkdir()
    (env / "parameters_data.yml").write_text(yaml.safe_dump({"data": {**GOOD["data"], "block_size": 2}}))
    message = error_of(merged(data__block_size=2), tmp_path, [*dirs, env])
    assert "conf/test/parameters_data.yml" in message


def test_recipe_is_frozen_and_hash_is_stable():
    a = validate_recipe(GOOD)
    b = validate_recipe({**GOOD, "run": {"seed": 0}})  # the default, spelled out
    assert a.hash() == b.hash()
    assert validate_recipe({**GOOD, "run": {"seed": 1}}).hash() != a.hash()
    with pytest.raises(ValidationError):
        a.run.seed = 5  # type: ignore[misc]


def test_structured_decay_names_its_criterion_and_its_wave_count():
    decay = {"method": "sparsegpt", "pattern": {"kind": "mlp_channels", "ratio": 0.25}}
    message = error_of(merged(decay=decay))
    assert "ranks whole units by magnitude or wanda, not sparsegpt" in message and "Fix: method: wanda" in message
    decay = {"method": "wanda", "pattern": {"kind": "blocks", "count": 3}, "waves": 2}
    assert "blocks are removed one a wave (3 waves), not in 2" in error_of(merged(decay=decay))
    decay = {"method": "wanda", "pattern": {"kind": "heads", "ratio": 0.5, "mode": "kv_groups"}}
    assert validate_recipe(merged(decay=decay), None).decay.structured


def test_qlora_without_cuda_is_refused_before_compute():
    message = error_of(merged(heal={"enabled": True, "quantize": "nf4"}, run={"device": "cpu"}))
    assert "heal.quantize: nf4 (QLoRA) needs a CUDA device" in message and "Fix: heal.quantize: none" in message


def test_fake_quant_healing_without_a_quantize_stage_is_refused():
    heal = {"enabled": True, "final": {"steps": 8, "lr": 1e-3, "fake_quant": True}}
    message = error_of(merged(heal=heal, quantize={"enabled": False}))
    assert "heal.final.fake_quant trains the final heal against the quantize stage's grids" in message
    assert "Fix: quantize.enabled: true, or heal.final.fake_quant: false" in message
    message = error_of(merged(heal=heal, quantize={"enabled": True, "method": "gptq"}))
    assert "quantize.method gptq then rounds differently" in message
    assert "Fix: quantize.method: rtn, or heal.final.fake_quant: false" in message
    assert validate_recipe(merged(heal=heal, quantize={"enabled": True, "method": "rtn"}), None).heal.final.fake_quant
    corrected = {"enabled": True, "method": "rtn", "lowrank": {"correction_rank": 4}}
    message = error_of(merged(heal=heal, quantize=corrected))
    assert "Fix: quantize.lowrank.correction_rank: 0, or heal.final.fake_quant: false" in message
    message = error_of(merged(heal={**heal, "quantize": "nf4"}, quantize={"enabled": True, "method": "rtn"}))
    assert "QLoRA (heal.quantize: nf4) trains against a 4-bit NF4 copy instead" in message


@pytest.mark.parametrize("target", [0.0, 1.01])
def test_an_explained_variance_target_outside_0_1_fails_validation(target):
    message = error_of(merged(quantize={"enabled": True, "lowrank": {"explained_variance": target}}))
    assert f"an explained-variance target of {target} is outside (0, 1]" in message
    assert "Fix: quantize.lowrank.explained_variance in (0, 1]" in message


def test_the_heal_taper_shrinks_steps_and_learning_rate():
    from birdbone.config import HealConfig

    config = HealConfig(steps=200, lr=2e-4)
    assert [config.wave_schedule(k, 4)[0] for k in (1, 2, 3, 4)] == [200, 150, 100, 50]
    assert config.wave_schedule(3, 4)[1] == pytest.approx(1e-4)
    assert HealConfig(steps=200, taper=False).wave_schedule(4, 4)[0] == 200


def test_quantize_bits_outside_2_to_8_and_unreachable_budgets_are_refused():
    message = error_of(merged(quantize={"enabled": True, "bits": 9}))
    assert "quantize.bits = 9" in message and "less than or equal to 8" in message
    message = error_of(merged(quantize={"mixed": {"enabled": True, "levels": [8, 4], "group": 32, "avg_bits": 4.2}}))
    assert "a budget of 4.2 bits per weight is below what the minimum of 4 bits allows (4.5" in message
    assert "Fix: avg_bits >= 4.5" in message
    message = error_of(merged(quantize={"mixed": {"levels": [8, 1]}}))
    assert "quantize.mixed.levels.1 = 1" in message and "greater than or equal to 2" in message
    message = error_of(merged(quantize={"head": {"enabled": True, "bits": 1}}))
    assert "quantize.head.bits = 1" in message and "greater than or equal to 2" in message
    message = error_of(merged(quantize={"head": {"enabled": True, "method": "awq"}}))
    assert "quantize.head.method" in message and "'rtn' or 'gptq'" in message


def test_export_checks_in_llama_cpp_need_a_gguf_and_formats_are_named():
    message = error_of({**GOOD, "export": {"enabled": True, "formats": ["safetensors"]}})
    assert "export.verify and export.speed run the GGUF file in llama.cpp" in message
    assert "Fix: add gguf to export.formats" in message
    message = error_of({**GOOD, "export": {"enabled": True, "formats": ["onnx"]}})
    assert "export.formats" in message and "onnx" in message
    message = error_of({**GOOD, "export": {"enabled": True, "verify": {"tolerance": 0}}})
    assert "export.verify.tolerance" in message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"decay__clusters": {"enabled": True}}, "Fix: profile.clusters.enabled: true"),
        (
            {"decay__recovery": {"enabled": True}, "heal": {"enabled": False}},
            "Fix: heal.enabled: true, or take heal out of decay.recovery.ladder",
        ),
        ({"heal": {"bundles": {"enabled": True}}}, "heal.bundles heals the profile's MLP-channel clusters"),
        (
            {
                "heal": {"bundles": {"enabled": True}},
                "profile": {"clusters": {"enabled": True}},
                "decay__pattern": {"kind": "mlp_channels", "ratio": 0.25},
                "decay__method": "magnitude",
            },
            "Fix: heal.bundles.enabled: false, or an unstructured or N:M pattern",
        ),
    ],
)
def test_the_cluster_options_need_their_profile_and_pattern(overrides, expected):
    params = merged(decay={"method": "wanda", "pattern": {"kind": "unstructured", "sparsity": 0.5}}, **overrides)
    assert expected in error_of(params)
