"""The README and docs/ say what the repository holds: the headline table's figures are the
committed bench JSON's, every relative link and anchor resolves, the configuration reference
is what ``birdbone config-docs`` makes of the Pydantic classes today."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)|!\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    found = {slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    return found | set(re.findall(r'<a id="([^"]+)"></a>', text))


def headline_rows(text: str) -> tuple[str, list[dict[str, str]]]:
    """The first table of the README (the result) as dicts, and the bench JSON it names."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    source = re.search(r"`(bench/results/[\w.]+\.json)`", "\n".join(lines[max(0, start - 8) : start]))
    assert source, "the result table names the bench JSON it comes from just above it"
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    header, rows = table[0], table[2:]
    return source.group(1), [dict(zip(header, row, strict=True)) for row in rows]


def test_the_readme_is_short_and_starts_with_its_result() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first_table = text.index("\n|")
    assert first_table < text.index("## "), "the result table comes before the first section"


def test_every_figure_in_the_readme_table_is_the_committed_bench_json() -> None:
    source, rows = headline_rows(README.read_text())
    report = json.loads((ROOT / source).read_text())
    by_name = {r["name"]: r for r in report["rows"]}
    assert {r["row"].strip("*") for r in rows} >= {"dense_f16", "default"}
    columns = {"MB": ("mb", 1), "decode x F16": ("decode_x", 2), "in-domain ppl": ("ppl_in_domain", 3)}
    for row in rows:
        measured = by_name[row["row"].strip("*")]
        for column, (key, digits) in columns.items():
            assert row[column].strip("*") == f"{measured[key]:.{digits}f}", (row["row"], column)
        dense = by_name["dense_f16"]["ppl_general"]
        general = row["general ppl"].strip("*")
        assert general.split(" ")[0] == f"{measured['ppl_general']:.3f}", (row["row"], "general ppl")
        if row["row"] != "dense_f16":
            rise = 100 * (measured["ppl_general"] / dense - 1)
            assert general.split(" ", 1)[1] == f"({rise:+.1f} %)", (row["row"], "general rise")
    assert report["date"] in README.read_text()[: README.read_text().index("\n|")]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        assert resolved.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {resolved.name}"


def test_the_configuration_reference_is_current(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    subprocess.run([sys.executable, "-m", "birdbone.console", "config-docs", "--out", str(out)], cwd=ROOT, check=True)
    assert out.read_text() == (ROOT / "docs/configuration.md").read_text(), (
        "docs/configuration.md is stale. Fix: birdbone config-docs"
    )
    for section in ("run", "model", "data", "decay", "heal", "quantize", "export"):
        assert f"\n## `{section}`\n" in out.read_text()
