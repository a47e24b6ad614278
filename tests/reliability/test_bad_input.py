"""Bad input, as a user gives it: each case runs `kedro run` in a project that already
finished a run, and checks the error's type, that its message names the problem and the
fix, and that no artifact already written changed (and no temporary file was left)."""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from birdbone.core import modeling
from birdbone.errors import (
    ConfigError,
    NonFiniteError,
    TextSourceError,
)
from tests.reliability.conftest import env_with, run_in_process, snapshot

TINY = {"kind": "tiny", "architecture": "llama", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 2}
SPLITS = {"test": 8, "validation": 8, "calibration": 16, "healing": 32}


@dataclass
class Case:
    """A bad input: ``setup(project, tmp)`` returns (env, --params) for the run."""

    setup: Callable[[Path, Path], tuple[str, dict[str, Any]]]
    error: type[Exception]
    says: list[str] = field(default_factory=list)  # regexes the message must match


def params(**override: Any) -> Callable[[Path, Path], tuple[str, dict[str, Any]]]:
    return lambda project, tmp: ("test", override)


# --------------------------------------------------------------------------- model files


def _save_tiny(directory: Path, vocab_model: int | None = None, poison: bool = False) -> Path:
    tokenizer = modeling.tiny_tokenizer(512)
    model = modeling.tiny_model(vocab=vocab_model or len(tokenizer))
    if poison:
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight[3, 5] = math.nan
    modeling.save_model(modeling.ModelBundle(model, tokenizer, modeling.adapter_for(model)), directory)
    return directory


def model_env(make: Callable[[Path], Path]) -> Callable[[Path, Path], tuple[str, dict[str, Any]]]:
    """A case whose model source is what ``make(tmp)`` writes (a directory or a .gguf)."""

    def setup(project: Path, tmp: Path) -> tuple[str, dict[str, Any]]:
        path = make(tmp)
        kind = "gguf" if path.suffix == ".gguf" else "hf_dir"
        return env_with(project, "case", model={"source": {"kind": kind, "path": str(path)}}), {}

    return setup


def _no_weights(tmp: Path) -> Path:
    directory = _save_tiny(tmp / "m")
    (directory / "model.safetensors").unlink()
    return directory


def _garbled_safetensors(tmp: Path) -> Path:
    directory = _save_tiny(tmp / "m")
    (directory / "model.safetensors").write_bytes(random.Random(0).randbytes(4096))
    return directory


def _truncated_safetensors(tmp: Path) -> Path:
    directory = _save_tiny(tmp / "m")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return directory


def _gguf(tmp: Path) -> Path:
    from birdbone.core.export.gguf import write_gguf

    tokenizer = modeling.tiny_tokenizer(512)
    model = modeling.tiny_model(vocab=len(tokenizer))
    path = tmp / "model.gguf"
    write_gguf(modeling.ModelBundle(model, tokenizer, modeling.adapter_for(model)), path, progress=False)
    return path


def _garbled_gguf(tmp: Path) -> Path:
    path = tmp / "model.gguf"
    path.write_bytes(random.Random(1).randbytes(8192))
    return path


def _truncated_gguf(tmp: Path) -> Path:
    path = _gguf(tmp)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def _gpt2(tmp: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp / "gpt2"
    config = GPT2Config(vocab_size=512, n_positions=128, n_embd=32, n_layer=1, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(directory)
    modeling.tiny_tokenizer(512).save_pretrained(directory)
    return directory


def _config_edit(**changes: Any) -> Callable[[Path], Path]:
    """A tiny model whose config.json says ``changes`` while its weights stay as they were."""

    def make(tmp: Path) -> Path:
        import json

        directory = _save_tiny(tmp / "m")
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **changes}))
        return directory

    return make


def _dev_zero_weights(tmp: Path) -> Path:
    directory = _save_tiny(tmp / "m")
    (directory / "model.safetensors").unlink()
    os.symlink("/dev/zero", directory / "model.safetensors")
    return directory


def _gguf_without_tokenizer(tmp: Path) -> Path:
    import gguf
    import numpy as np

    path = tmp / "bare.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --------------------------------------------------------------------------- text files


def text_env(content: bytes | None, splits: dict[str, Any] | None = None, block: int = 64) -> Callable:
    """A case whose only text source is a .txt file holding ``content`` (None: pydoc)."""

    def setup(project: Path, tmp: Path) -> tuple[str, dict[str, Any]]:
        source: dict[str, Any] = {"kind": "pydoc_topics"}
        if content is not None:
            (tmp / "text.txt").write_bytes(content)
            source = {"kind": "txt", "path": str(tmp / "text.txt")}
        data = {"sources": [source], "block_size": block, "splits": splits or SPLITS, "seed": 0}
        return env_with(project, "case", data=data), {}

    return setup


def special_text(path: str | None) -> Callable[[Path, Path], tuple[str, dict[str, Any]]]:
    """A case whose text source is a FIFO (None) or a device such as /dev/zero."""

    def setup(project: Path, tmp: Path) -> tuple[str, dict[str, Any]]:
        where = path
        if where is None:
            os.mkfifo(tmp / "pipe.txt")
            where = str(tmp / "pipe.txt")
        data = {"sources": [{"kind": "txt", "path": where}], "block_size": 64, "splits": SPLITS, "seed": 0}
        return env_with(project, "case", data=data), {}

    return setup


def task_env(line: str, kind: str = "canary", name: str | None = None) -> Callable:
    """A case whose one task file holds ``line``."""

    def setup(project: Path, tmp: Path) -> tuple[str, dict[str, Any]]:
        (tmp / "task.jsonl").write_text(line + "\n")
        task: dict[str, Any] = {"kind": kind, "path": str(tmp / "task.jsonl")}
        if name is not None:
            task["name"] = name
        return "test", {"baseline": {"tasks": [task]}}

    return setup


CASES: dict[str, Case] = {
    # typos, at every stage: the key, where it was set, the near miss
    "typo in run": Case(params(run={"sed": 1}), ConfigError, [r"run\.sed: unknown key", "set with --params"]),
    "typo in model": Case(params(model={"dtyp": "float32"}), ConfigError, [r"model\.dtyp", "did you mean 'dtype'"]),
    "typo in data": Case(params(data={"block_sise": 64}), ConfigError, ["did you mean 'block_size'"]),
    "typo in baseline": Case(params(baseline={"batchsize": 8}), ConfigError, ["did you mean 'batch_size'"]),
    "typo in profile": Case(params(profile={"blocs": 8}), ConfigError, ["did you mean 'blocks'"]),
    "typo in decay": Case(params(decay={"metod": "wanda"}), ConfigError, ["did you mean 'method'"]),
    "typo in heal": Case(params(heal={"rnak": 4}), ConfigError, ["did you mean 'rank'"]),
    "typo in regrow": Case(params(regrow={"fractoin": 0.1}), ConfigError, ["did you mean 'fraction'"]),
    "typo in quantize": Case(params(quantize={"bitz": 4}), ConfigError, ["did you mean 'bits'"]),
    "typo in export": Case(params(export={"formts": ["gguf"]}), ConfigError, ["did you mean 'formats'"]),
    "typo in tracking": Case(params(tracking={"experimnt": "x"}), ConfigError, ["did you mean 'experiment'"]),
    "unknown stage": Case(params(quantise={"bits": 4}), ConfigError, ["quantise: unknown key", "quantize"]),
    # wrong types and values out of range
    "wrong type in heal": Case(params(heal={"steps": "many"}), ConfigError, [r"heal\.steps = 'many'", "valid integer"]),
    "wrong type in data": Case(params(data={"block_size": 64.5}), ConfigError, [r"block_size = 64\.5", "integer"]),
    "wrong type in baseline": Case(params(baseline={"batch_size": [8]}), ConfigError, [r"size = \[8\]", "integer"]),
    "wrong type in profile": Case(params(profile={"gram": "perhaps"}), ConfigError, [r"gram = 'perhaps'", "boolean"]),
    "wrong type in export": Case(params(export={"formats": 7}), ConfigError, [r"export\.formats = 7", "list"]),
    "wrong type in tracking": Case(params(tracking={"enabled": "maybe"}), ConfigError, ["= .maybe.", "boolean"]),
    "sparsity out of range": Case(
        params(decay={"pattern": {"kind": "unstructured", "sparsity": 1.5}}), ConfigError, ["less than 1", "Fix:"]
    ),
    "bits out of range": Case(params(quantize={"bits": 12}), ConfigError, [r"quantize\.bits = 12", "less than or"]),
    "unknown choice": Case(params(decay={"method": "lottery"}), ConfigError, ["lottery", "wanda"]),
    # contradictory settings
    "N:M with another sparsity": Case(
        params(decay={"pattern": {"kind": "nm", "n": 2, "m": 4, "sparsity": 0.6}}, regrow={"enabled": False}),
        ConfigError,
        ["2:4 removes exactly 0.5", "contradicts sparsity 0.6", "Fix: drop sparsity"],
    ),
    "bit budget below the minimum bits": Case(
        params(quantize={"mixed": {"enabled": True, "avg_bits": 3.0, "levels": [8, 4], "group": 32}}),
        ConfigError,
        ["budget of 3.0 bits per weight is below", r"Fix: avg_bits >= 4\.5"],
    ),
    "regrow with N:M": Case(
        params(decay={"pattern": {"kind": "nm", "n": 2, "m": 4}}, regrow={"enabled": True}),
        ConfigError,
        ["regrow swaps single connections", "Fix: regrow.enabled: false"],
    ),
    "fake-quant heal without quantize": Case(
        params(heal={"final": {"fake_quant": True}}, quantize={"enabled": False}),
        ConfigError,
        ["quantize.enabled is false", "Fix: quantize.enabled: true"],
    ),
    "cuda without a GPU": Case(params(run={"device": "cuda"}), ConfigError, ["no CUDA device", "Fix: set run.device"]),
    # models
    "model path that does not exist": Case(
        lambda project, tmp: (env_with(project, "case", model={"source": {"kind": "hf_dir", "path": "nowhere/m"}}), {}),
        ConfigError,
        ["directory 'nowhere/m' does not exist", "fix the path"],
    ),
    "directory without weights": Case(model_env(_no_weights), ConfigError, ["no weights", "Fix: copy the weights"]),
    "garbled safetensors": Case(
        model_env(_garbled_safetensors), ConfigError, ["not a safetensors file|damaged safetensors", "copy or download"]
    ),
    "truncated safetensors": Case(
        model_env(_truncated_safetensors), ConfigError, ["truncated: its header promises", "the file has"]
    ),
    "garbled GGUF": Case(model_env(_garbled_gguf), ConfigError, ["is not a GGUF file", "download or export"]),
    "truncated GGUF": Case(model_env(_truncated_gguf), ConfigError, ["damaged or truncated", "download or export"]),
    "unsupported architecture": Case(
        model_env(_gpt2), ConfigError, ["architecture 'gpt2' is not supported", "llama, mistral, qwen2"]
    ),
    "tokenizer of another model": Case(
        model_env(lambda tmp: _save_tiny(tmp / "m", vocab_model=300)),
        ConfigError,
        ["token ids up to 511", "300 embedding rows", "do not belong together"],
    ),
    "NaN in the model's weights": Case(
        model_env(lambda tmp: _save_tiny(tmp / "m", poison=True)),
        NonFiniteError,
        [r"NaN/inf weights: model\.layers\.1\.mlp\.up_proj\.weight \(1\)", "damaged"],
    ),
    # text
    "empty text": Case(text_env(b"   \n\n"), TextSourceError, ["holds no text", "Fix: fill it"]),
    "binary data as text": Case(
        text_env(random.Random(2).randbytes(20000)), TextSourceError, ["is not UTF-8 text", "convert it to UTF-8"]
    ),
    "binary data that decodes as UTF-8": Case(
        text_env(bytes(range(0, 128)) * 200), TextSourceError, ["looks like binary data", "NUL bytes"]
    ),
    "text shorter than one block": Case(
        text_env(b"A few words.", block=64), TextSourceError, ["= 0 blocks of 64", "Fix: add text"]
    ),
    "text shorter than the splits": Case(
        text_env(None, {"test": 9000, "validation": 8, "calibration": 16, "healing": 32}),
        TextSourceError,
        ["but the splits ask for", "ask for fewer blocks"],
    ),
    "malformed task file": Case(
        lambda project, tmp: (
            (tmp / "mc.jsonl").write_text('{"question": "2+2?"}\n'),
            ("test", {"baseline": {"tasks": [{"kind": "multiple_choice", "path": str(tmp / "mc.jsonl")}]}}),
        )[1],
        ConfigError,
        [r"mc.jsonl:1 lacks \['choices', 'answer'\]", "Fix: add them"],
    ),
    # issue 23: inputs that crashed, hung, loaded random weights or were silently misread
    "config with more layers than the weights": Case(
        model_env(_config_edit(num_hidden_layers=3)),
        ConfigError,
        [r"weights do not fit config.json \(3 layers", r"missing 9 \(model.layers.2", "Fix: put the config.json"],
    ),
    "config widths that disagree with the weights": Case(
        model_env(_config_edit(intermediate_size=96)),
        ConfigError,
        [r"of another shape \(model.layers.0.mlp.down_proj.weight \[64, 128\] for \[64, 96\]", "Fix:"],
    ),
    "/dev/zero as weights": Case(model_env(_dev_zero_weights), ConfigError, ["not a regular file", "Fix: point at"]),
    "GGUF without a tokenizer": Case(
        model_env(_gguf_without_tokenizer),
        ConfigError,
        ["holds no tokenizer", "Fix: a GGUF written with its tokenizer"],
    ),
    "FIFO as text": Case(special_text(None), ConfigError, ["pipe.txt' is not a regular file", "FIFO"]),
    "/dev/zero as text": Case(special_text("/dev/zero"), ConfigError, ["'/dev/zero' is not a regular file"]),
    "int prompt in a canary": Case(
        task_env('{"prompt": 5, "expected": "x"}'), ConfigError, ["'prompt' must be non-empty text, got 5"]
    ),
    "empty prompt in a canary": Case(
        task_env('{"prompt": " ", "expected": "x"}'), ConfigError, ["'prompt' must be non-empty text"]
    ),
    "list as expected": Case(
        task_env('{"prompt": "2+2=", "expected": ["4"]}'), ConfigError, [r"'expected' must be non-empty text"]
    ),
    "null question": Case(
        task_env('{"question": null, "choices": ["a", "b"], "answer": 0}', "multiple_choice"),
        ConfigError,
        ["'question' must be non-empty text, got None"],
    ),
    "answer true": Case(
        task_env('{"question": "q?", "choices": ["a", "b"], "answer": true}', "multiple_choice"),
        ConfigError,
        ["'answer' must be the index", "got True"],
    ),
    "task name MLflow refuses": Case(
        task_env('{"prompt": "2+2=", "expected": "4"}', name="Q&A: general"),
        ConfigError,
        ["task name 'Q&A: general' has characters MLflow refuses", "Fix: name: Q_A_ general"],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_named_with_its_fix_and_damages_nothing(name, finished, tmp_path, monkeypatch):
    case = CASES[name]
    monkeypatch.chdir(finished)
    before = snapshot(finished)
    env, overrides = case.setup(finished, tmp_path)
    with pytest.raises(case.error) as raised:
        run_in_process(finished, env, **overrides)
    message = str(raised.value)
    for pattern in case.says:
        assert __import__("re").search(pattern, message), f"{pattern!r} not in:\n{message}"
    assert snapshot(finished) == before
    assert not [p for p in finished.rglob(".tmp-*")]
    assert not (finished / ".birdbone" / "run.lock").read_text(), "the lock was not released"


def test_there_are_at_least_25_cases():
    assert len(CASES) >= 25


def test_the_cli_prints_the_message_not_a_traceback(finished, tmp_path):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env", "test", "--params", "decay.metod=wanda"],
        cwd=finished,
        capture_output=True,
        text=True,
        env={**os.environ},
    )
    assert done.returncode != 0
    assert "bird-bone stopped: ConfigError" in done.stderr and "did you mean 'method'" in done.stderr
    assert "Traceback" not in done.stderr


def test_kedro_run_from_a_subfolder_prints_the_message_not_a_traceback(finished):
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "kedro", "run", "--env", "test"],
        cwd=finished / "conf",
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0
    assert "bird-bone stopped: ConfigError" in done.stderr and f"Fix: cd {finished.resolve()} first" in done.stderr
    assert "Traceback" not in done.stderr and "❱" not in done.stderr, done.stderr[-3000:]
