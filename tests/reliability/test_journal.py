"""The resume journal knows an artifact by its bytes: a copy of the project or the same
files brought back by ``dvc checkout`` count as done; changed bytes, a changed recipe, or
a file gone are made again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from birdbone.runstate import Journal


def _project(root: Path) -> Journal:
    (root / "models/healed").mkdir(parents=True)
    (root / "models/healed/model.safetensors").write_bytes(b"w" * 4096)
    (root / "models/healed/birdbone.json").write_text("{}")
    (root / "data").mkdir()
    (root / "data/report.json").write_text('{"ppl": 12.0}')
    journal = Journal(root, "recipe-a")
    for artifact in ("models/healed", "data/report.json"):
        journal.record(root / artifact)
    return journal


def test_a_copied_project_and_files_rewritten_with_the_same_bytes_count_as_done(tmp_path: Path) -> None:
    _project(tmp_path / "a")
    copy = tmp_path / "b"
    shutil.copytree(tmp_path / "a", copy, copy_function=shutil.copyfile)  # new inodes, new mtimes
    journal = Journal(copy, "recipe-a")
    assert journal.done(copy / "models/healed") and journal.done(copy / "data/report.json")
    # as dvc checkout does: the file replaced by a copy of the same bytes
    report = copy / "data/report.json"
    report.unlink()
    report.write_text('{"ppl": 12.0}')
    os.utime(report, ns=(1, 1))
    assert Journal(copy, "recipe-a").done(report)
    # the new stats were noted: the next check needs no read of the bytes
    entries = json.loads((copy / ".birdbone/journal.json").read_text())["artifacts"]
    assert entries["data/report.json"]["stats"] == [[".", report.stat().st_size, 1]]


def test_changed_bytes_a_new_file_a_missing_file_or_another_recipe_are_made_again(tmp_path: Path) -> None:
    _project(tmp_path)
    (tmp_path / "data/report.json").write_text('{"ppl": 99.0}')
    assert not Journal(tmp_path, "recipe-a").done(tmp_path / "data/report.json")
    (tmp_path / "models/healed/extra.bin").write_bytes(b"x")
    assert not Journal(tmp_path, "recipe-a").done(tmp_path / "models/healed")
    (tmp_path / "models/healed/extra.bin").unlink()
    assert Journal(tmp_path, "recipe-a").done(tmp_path / "models/healed")
    assert not Journal(tmp_path, "recipe-b").done(tmp_path / "models/healed")
    shutil.rmtree(tmp_path / "models/healed")
    assert not Journal(tmp_path, "recipe-a").done(tmp_path / "models/healed")
    assert not Journal(tmp_path, "recipe-a", resume=False).done(tmp_path / "data/report.json")


def test_a_link_in_a_model_folder_is_not_followed_out(tmp_path: Path) -> None:
    _project(tmp_path / "p")
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"s" * 10)
    (tmp_path / "p/models/healed/link.bin").symlink_to(outside)
    journal = Journal(tmp_path / "p", "recipe-a")
    assert journal.done(tmp_path / "p/models/healed")  # the link is no file of the artifact
    outside.write_bytes(b"t" * 10)
    assert journal.done(tmp_path / "p/models/healed")
