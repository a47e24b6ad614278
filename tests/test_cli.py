"""``birdbone heal`` through ``accelerate launch`` with one CPU process: the healed model
directory keeps the masks and says how it was made."""

import json
import subprocess
import sys
from pathlib import Path

import click
import torch

from birdbone.config import UnstructuredPattern
from birdbone.core.masks import MaskSet
from birdbone.core.prune import prune_
from birdbone.datasets import ModelDataset, TensorsDataset
from tests.conftest import blocks_of
from tests.core.test_heal import patterned

BIRDBONE = Path(sys.executable).parent / "birdbone"


def test_heal_runs_under_accelerate_launch_and_keeps_the_masks(project, tiny_bundle):
    masks, _ = prune_(tiny_bundle, "wanda", UnstructuredPattern(kind="unstructured", sparsity=0.5), blocks_of(4, 512))
    tiny_bundle.masks = masks
    tiny_bundle.origin = {"test": True}
    ModelDataset("models/pruned").save(tiny_bundle)
    TensorsDataset("data/03_primary/blocks.safetensors").save(
        {"healing": patterned(32), "validation": patterned(4, seed=5), "test": patterned(4, seed=6)}
    )
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [*launch, "-m", "birdbone.console", "heal", "models/pruned", "--out", "models/healed", "--env", "test"]
    done = subprocess.run([*command, "--steps", "6"], cwd=project, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    healed = ModelDataset("models/healed").load()
    assert healed.masks.equals(masks)
    weights = {f"{n}.weight": m.weight for n, m in healed.adapter.linears(healed.model).items()}
    assert MaskSet.from_weights(weights).equals(masks)
    before = {f"{n}.weight": m.weight for n, m in tiny_bundle.adapter.linears(tiny_bundle.model).items()}
    assert not any(torch.equal(weights[n], before[n]) for n in weights)
    report = json.loads((project / "models/healed/heal.json").read_text())
    assert report["processes"] == 1 and report["steps"] == 6 and report["merged"] and report["ppl_test"] > 0


def test_pack_and_unpack_round_trip_a_model_directory(tiny_bundle, tmp_path):
    from safetensors.torch import load_file

    ModelDataset(str(tmp_path / "model")).save(tiny_bundle)
    out = subprocess.run(
        [str(BIRDBONE), "pack", str(tmp_path / "model"), str(tmp_path / "m.pack")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "| gzip |" in out.stdout or "| raw |" in out.stdout
    assert "lossless" in out.stdout
    again = subprocess.run(
        [str(BIRDBONE), "pack", str(tmp_path / "model"), str(tmp_path / "m.pack")], capture_output=True, text=True
    )
    assert again.returncode == 2 and "exists. Fix: choose another path, or pass overwrite" in again.stderr
    assert subprocess.run([str(BIRDBONE), "unpack", str(tmp_path / "m.pack"), str(tmp_path / "back")]).returncode == 0
    before, after = load_file(tmp_path / "model/model.safetensors"), load_file(tmp_path / "back/model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_repository_commands_name_what_is_wrong_and_the_fix(tmp_path, monkeypatch, capsys):
    from birdbone.console import main

    monkeypatch.chdir(tmp_path)  # no git repository, no conf/, no run
    assert main(["bump"]) == 2
    assert "'HEAD' is not a commit of the git repository at" in capsys.readouterr().err
    assert main(["report"]) == 2
    err = capsys.readouterr().err
    assert "no run to report on" in err and "Fix: kedro run (or dvc repro) first" in err
    assert main(["params", "--env", "test"]) == 2
    assert "no conf/base. Fix: run it in the project root, or pass --conf" in capsys.readouterr().err
    (tmp_path / "conf/base").mkdir(parents=True)
    assert main(["params", "--env", "prod"]) == 2
    assert "no environment prod in conf (there: base)" in capsys.readouterr().err
    subprocess.run(["git", "init", "-q"], check=True)
    assert main(["bump", "--rev", "v9"]) == 2
    assert "'v9' is not a commit" in capsys.readouterr().err
    assert not (tmp_path / "diffs").exists() and not (tmp_path / "params.yaml").exists()


def test_heal_names_each_bad_argument_before_loading_anything(project, tiny_bundle, capsys):
    from birdbone import runstate
    from birdbone.console import main

    ModelDataset("models/pruned").save(tiny_bundle)
    TensorsDataset("data/03_primary/blocks.safetensors").save(
        {"healing": patterned(8), "validation": patterned(4, seed=5), "test": patterned(4, seed=6)}
    )
    (project / "notes.txt").write_text("not a model")
    (project / "not-blocks.safetensors").write_text("text")
    heal = ["heal", "models/pruned", "--out", "models/healed", "--env", "test"]
    cases = [
        (["heal", "models/nowhere", "--out", "x", "--env", "test"], "no model at models/nowhere. Fix:"),
        (["heal", "notes.txt", "--out", "x", "--env", "test"], "notes.txt is not a bird-bone model directory"),
        (
            [*heal[:4], "--env", "prod"],
            "no environment prod in conf (there: base, gpu, local, structured, test). Fix: --env",
        ),
        ([*heal, "--blocks", "missing.safetensors"], "no token blocks at missing.safetensors. Fix:"),
        ([*heal, "--blocks", "not-blocks.safetensors"], "not-blocks.safetensors is not a safetensors file of token"),
        ([*heal, "--steps", "-5"], "--steps -5: healing needs at least one step. Fix: --steps 1"),
        ([*heal, "--lr", "nan"], "--lr nan: the learning rate must be a positive number"),
        (["heal", "models/pruned", "--out", "models/pruned", "--env", "test"], "is the model being healed"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert not (project / "models/healed").exists() and not (project / "x").exists()
    lock = runstate.RunLock(project)  # a kedro run holds the project: heal waits its turn
    lock.acquire(env="test")
    try:
        assert main([*heal, "--steps", "1"]) == 2
        assert "another bird-bone run is using this project" in capsys.readouterr().err
    finally:
        lock.release()
    assert not (project / "models/healed").exists()


def test_report_params_and_unpack_name_broken_inputs(tmp_path, monkeypatch, capsys):
    from birdbone.console import main

    monkeypatch.chdir(tmp_path)
    reports = tmp_path / "data/08_reporting"
    reports.mkdir(parents=True)
    (reports / "summary.json").write_text('{"baseline": {"ppl_te')
    assert main(["report"]) == 2
    assert "summary.json is not readable JSON" in capsys.readouterr().err
    (reports / "summary.json").write_text("[1, 2]")
    assert main(["report"]) == 2
    assert "holds a JSON list, not the object of sections a run writes" in capsys.readouterr().err
    assert main(["unpack", "nope.pack", "out"]) == 2
    assert "nope.pack does not exist. Fix" in capsys.readouterr().err
    (tmp_path / "conf/base").mkdir(parents=True)
    (tmp_path / "conf/local").mkdir()
    (tmp_path / "folder").mkdir()
    assert main(["params", "--out", "folder"]) == 2
    assert "--out folder is a folder; the recipe is one YAML file" in capsys.readouterr().err
    assert main(["pack", "conf", "m.pack"]) == 2
    assert "conf holds no .safetensors file" in capsys.readouterr().err


def test_the_cli_has_a_version_help_for_every_option_and_shows_defaults(capsys):
    from birdbone.console import cli, main
    from birdbone.core.export.pack import STRATEGIES

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == "birdbone, version 0.1.0"
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(name in top for name in cli.commands)
    for name, command in cli.commands.items():
        assert command.help and command.short_help, name
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                assert param.help, f"{name} --{param.name}"
    assert main(["heal", "--help"]) == 0
    assert "[default: data/03_primary/blocks.safetensors]" in capsys.readouterr().out
    strategy = next(p for p in cli.commands["pack"].params if p.name == "strategy")
    assert list(strategy.type.choices) == ["auto", *STRATEGIES]
    assert main(["pack", "a", "b", "--strategy", "zip"]) == 2
    assert "Invalid value for '--strategy': 'zip' is not one of 'auto', 'raw'" in capsys.readouterr().err
    assert main(["nonsense"]) == 2
    assert "No such command 'nonsense'" in capsys.readouterr().err
