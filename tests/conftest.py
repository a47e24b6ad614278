"""Shared fixtures: tiny models built in code, and a throwaway copy of the project."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from birdbone.core import modeling

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return modeling.tiny_tokenizer(512)


@pytest.fixture()
def tiny_bundle(tiny_tokenizer):
    model = modeling.tiny_model(
        "llama", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=len(tiny_tokenizer), seed=0
    )
    return modeling.ModelBundle(model, tiny_tokenizer, modeling.adapter_for(model))


@pytest.fixture()
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project's conf and raw data in a temp dir, so runs write nothing here.
    The working directory is the copy, as under `kedro run`."""
    monkeypatch.chdir(tmp_path)
    for name in ("conf", "data/01_raw"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("local"))
    (tmp_path / "conf" / "local").mkdir()
    (tmp_path / "src").mkdir()  # the package itself is installed; kedro only checks the folder
    for name in ("pyproject.toml", ".telemetry"):
        shutil.copy(ROOT / name, tmp_path / name)
    return tmp_path


def blocks_of(tokens: int, vocab: int, length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (tokens, length), generator=generator)
