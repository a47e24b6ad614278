"""One rule for every folder bird-bone writes whole: it replaces a folder only if bird-bone
wrote it (its birdbone.json says so) or the user passed an explicit overwrite; anything
else is a named error before compute, and the folder is left as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from birdbone.core.io import OWNER_FILE, atomic_dir, check_replaceable, written_by_birdbone
from birdbone.errors import OutputError
from tests.reliability.conftest import make_project, run_in_process


def users_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "thesis.tex").write_text("three years of work")
    return path


def test_a_folder_bird_bone_did_not_write_is_refused_and_left_as_it_was(tmp_path):
    mine = users_folder(tmp_path / "mine")
    refused = r"mine exists and is a folder bird-bone did not write.*Nothing was written"
    with pytest.raises(OutputError, match=refused), atomic_dir(mine) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x")
    assert (mine / "thesis.tex").read_text() == "three years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left


def test_an_explicit_overwrite_replaces_it(tmp_path):
    mine = users_folder(tmp_path / "mine")
    with atomic_dir(mine, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
    assert {p.name for p in mine.iterdir()} == {OWNER_FILE, "a"}


def test_what_bird_bone_wrote_an_empty_folder_and_a_new_path_are_replaced(tmp_path):
    for target in (tmp_path / "new", tmp_path / "empty"):
        if target.name == "empty":
            target.mkdir()
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("1")
        assert written_by_birdbone(target)
        with atomic_dir(target) as tmp:  # its own folder: replaced without asking
            (tmp / "b").write_text("2")
        assert {p.name for p in target.iterdir()} == {OWNER_FILE, "b"}


def test_a_mark_that_lies_or_is_a_link_does_not_count(tmp_path):
    fake = users_folder(tmp_path / "fake")
    (fake / OWNER_FILE).write_text(json.dumps({"written_by": "someone else"}))
    linked = users_folder(tmp_path / "linked")
    (tmp_path / "mark.json").write_text(json.dumps({"written_by": "bird-bone"}))
    os.symlink(tmp_path / "mark.json", linked / OWNER_FILE)
    broken = users_folder(tmp_path / "broken")
    (broken / OWNER_FILE).write_text("{not json")
    for folder in (fake, linked, broken):
        assert not written_by_birdbone(folder)
        with pytest.raises(OutputError, match="did not write"):
            check_replaceable(folder)


def test_a_link_or_a_file_in_the_way_is_refused_and_never_followed(tmp_path):
    outside = users_folder(tmp_path / "outside")
    os.symlink(outside, tmp_path / "link")
    with pytest.raises(OutputError, match=r"link exists and is a symbolic link \(to .*outside\)"):
        check_replaceable(tmp_path / "link")
    with atomic_dir(tmp_path / "link", overwrite=True) as tmp:  # the link goes, not what it points to
        (tmp / "a").write_text("1")
    assert not (tmp_path / "link").is_symlink() and (outside / "thesis.tex").is_file()
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt exists and is a file"):
        check_replaceable(tmp_path / "notes.txt", hint=", pass --overwrite")


@pytest.mark.parametrize("where", ["models", "mine"])
def test_export_path_on_a_users_folder_stops_the_run_before_compute(tmp_path, monkeypatch, where):
    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    users_folder(project / where / "by-hand")
    (project / where / "notes.md").write_text("mine")
    before = sorted(str(p.relative_to(project)) for p in (project / where).rglob("*"))
    with pytest.raises(OutputError, match=rf"{where} exists and is a folder bird-bone did not write"):
        run_in_process(project, "test", export={"path": where})
    assert sorted(str(p.relative_to(project)) for p in (project / where).rglob("*")) == before
    assert not (project / "data" / "03_primary" / "blocks.safetensors").exists()  # stopped before the first node
    assert not (project / ".birdbone" / "run.lock").read_text(), "the lock was not released"


def test_heal_out_on_a_users_folder_is_refused_before_loading(tmp_path, monkeypatch, tiny_bundle, capsys):
    from birdbone.console import main
    from birdbone.datasets import ModelDataset

    project = make_project(tmp_path / "project")
    monkeypatch.chdir(project)
    ModelDataset("models/decayed").save(tiny_bundle)
    (project / "data" / "03_primary").mkdir(parents=True, exist_ok=True)
    (project / "data" / "03_primary" / "blocks.safetensors").write_bytes(b"never read")
    raw = sorted(p.name for p in (project / "data" / "01_raw").iterdir())
    code = main(["heal", "models/decayed", "--out", "data/01_raw", "--env", "test"])
    assert code == 2
    assert "data/01_raw exists and is a folder bird-bone did not write" in capsys.readouterr().err
    assert sorted(p.name for p in (project / "data" / "01_raw").iterdir()) == raw
