"""Diff bundles: what one commit changed, against its parent, in ``diffs/<sha>/``.

A bundle holds the settings that changed (dotted keys of ``params.yaml``, old and new), a
per-layer mask delta of the recipe's last pruned model (weights removed, weights revived:
regrown or restored), the change of every number in ``summary.json``, and the SHA-256 of
each weight file of the commit. The parent's files come from git (``params.yaml``) and from
DVC (models and reports, through ``dvc.api``: the local cache, else the remote). No Kedro
here: ``birdbone bump`` and the git hook call it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from birdbone.core.io import atomic_dir, flatten, sha256_file
from birdbone.core.masks import MaskSet
from birdbone.errors import BirdboneError

# the recipe's last pruned model, most processed first
MASKED_MODELS = ("models/quantized", "models/healed", "models/decayed")
SUMMARY = "data/08_reporting/summary.json"


class DiffError(BirdboneError):
    """A diff bundle cannot be made (not a git repository, an unknown revision)."""


def params_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every setting whose value differs: ``{key, before, after}`` (None: absent)."""
    old, new = flatten(before or {}), flatten(after or {})
    return [
        {"key": key, "before": old.get(key), "after": new.get(key)}
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def metric_deltas(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Every number in a report, old and new and the change (None where one side lacks it)."""
    old, new = flatten(before or {}), flatten(after or {})
    rows = []
    for key in sorted(old.keys() | new.keys()):
        a, b = old.get(key), new.get(key)
        numeric = [isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b)]
        if not any(numeric) or a == b:
            continue
        change = b - a if all(numeric) else None  # type: ignore[operator]
        rows.append({"key": key, "before": a, "after": b, "change": change})
    return rows


def mask_delta(before: MaskSet | None, after: MaskSet | None) -> dict[str, Any]:
    """Per masked weight: kept before and after, weights removed (kept, now pruned) and
    revived (pruned, now kept: regrown or restored); a weight whose shape changed
    (structure removed) reports both shapes instead."""
    layers = []
    names = sorted(set(before or []) | set(after or []))
    for name in names:
        row: dict[str, Any] = {"name": name}
        a = before[name] if before is not None and name in before else None
        b = after[name] if after is not None and name in after else None
        row["kept_before"] = None if a is None else int(a.sum())
        row["kept_after"] = None if b is None else int(b.sum())
        if a is not None and b is not None and a.shape == b.shape:
            row["removed"] = int((a & ~b).sum())
            row["revived"] = int((~a & b).sum())
        else:
            row["shape_before"] = None if a is None else list(a.shape)
            row["shape_after"] = None if b is None else list(b.shape)
            row["removed"] = row["revived"] = None
        if row["kept_before"] != row["kept_after"] or row.get("removed") or row.get("revived") or "shape_after" in row:
            layers.append(row)
    total = {key: sum(r[key] for r in layers if r.get(key) is not None) for key in ("removed", "revived")}
    return {"changed_layers": len(layers), **total, "layers": layers}


# --------------------------------------------------------------------------- reading revisions


def run_dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``dvc ARGS`` through this interpreter (``python -m dvc``): the venv's DVC, also when
    the venv is not activated, as under the git hooks."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)


def project_root(start: Path | None = None) -> Path:
    """The bird-bone project ``start`` (default: the working directory) is in: the nearest
    folder up from it with a Kedro ``pyproject.toml``.

    Raises:
        DiffError: none (run outside a project).
    """
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        pyproject = folder / "pyproject.toml"
        if pyproject.is_file() and "[tool.kedro]" in pyproject.read_text(errors="replace"):
            return folder
    raise DiffError(
        f"{start} is not inside a bird-bone project (no pyproject.toml with [tool.kedro] above it). "
        "Fix: cd into the project."
    )


def version_tags(root: Path, commit: str | None = None) -> list[str]:
    """The ``model-v<N>`` tags (those that point at ``commit``, if given), lowest N first."""
    tags = git(root, "tag", "--list", "model-v*", *(("--points-at", commit) if commit else ())).split()
    return sorted((t for t in tags if t.removeprefix("model-v").isdigit()), key=lambda t: int(t[7:]))


def git(root: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if done.returncode:
        raise DiffError(f"git {' '.join(args)} failed in {root}: {done.stderr.strip()}")
    return done.stdout


def resolve(root: Path, rev: str) -> str:
    try:
        return git(root, "rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    except DiffError as exc:
        raise DiffError(f"'{rev}' is not a commit of the git repository at {root}. Fix: a commit or tag.") from exc


def parent_of(root: Path, sha: str) -> str | None:
    parents = git(root, "rev-list", "--parents", "-n", "1", sha).split()[1:]
    return parents[0] if parents else None


def read_bytes(root: Path, path: str, rev: str | None) -> bytes | None:
    """A file's bytes at ``rev`` (None: the workspace): from git when git tracks it, else
    from DVC (cache or remote); None when the revision has no such file."""
    if rev is None:
        full = root / path
        return full.read_bytes() if full.is_file() else None
    done = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True)
    if done.returncode == 0:
        return done.stdout
    try:
        import dvc.api

        with dvc.api.open(path, repo=str(root), rev=rev, mode="rb") as handle:
            return handle.read()
    except Exception:  # noqa: BLE001  (absent at that revision, or never pushed: reported as missing)
        return None


def masks_at(root: Path, rev: str | None) -> tuple[str | None, MaskSet | None]:
    """The recipe's last pruned model at ``rev`` and its masks (None, None: no masks)."""
    for model in MASKED_MODELS:
        data = read_bytes(root, f"{model}/masks.safetensors", rev)
        if data is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "masks.safetensors"
                path.write_bytes(data)
                return model, MaskSet.load(path)
    return None, None


def yaml_at(root: Path, path: str, rev: str | None) -> dict[str, Any] | None:
    data = read_bytes(root, path, rev)
    return None if data is None else yaml.safe_load(data)


def json_at(root: Path, path: str, rev: str | None) -> dict[str, Any] | None:
    data = read_bytes(root, path, rev)
    return None if data is None else json.loads(data)


def weight_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every weight, mask and quantization file under ``models/``."""
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted((root / "models").rglob("*.safetensors"))
        if not any(part.startswith(".tmp-") for part in p.parts)
    }


def write_bundle(root: Path, rev: str = "HEAD", out: Path | None = None) -> Path:
    """Writes ``diffs/<sha>/`` for commit ``rev`` against its parent (atomically) and
    returns its path. The commit's own files are read from the workspace when ``rev`` is
    what is checked out (models are in the workspace then), else from git and DVC."""
    root = root.resolve()
    sha = resolve(root, rev)
    parent = parent_of(root, sha)
    head = resolve(root, "HEAD")
    at = None if sha == head else sha
    model, new_masks = masks_at(root, at)
    _, old_masks = masks_at(root, parent) if parent else (None, None)
    bundle = {
        "commit": sha,
        "parent": parent,
        "message": git(root, "log", "-1", "--format=%s", sha).strip(),
        "params": params_delta(
            yaml_at(root, "params.yaml", parent) if parent else None, yaml_at(root, "params.yaml", at)
        ),
        "files": [f for f in git(root, "diff", "--name-only", parent or _EMPTY_TREE, sha).split() if f],
        "masks": {"model": model, **mask_delta(old_masks, new_masks)},
        "metrics": metric_deltas(json_at(root, SUMMARY, parent) if parent else None, json_at(root, SUMMARY, at)),
        "weights_sha256": weight_hashes(root) if at is None else None,
    }
    target = (out or root / "diffs") / sha
    # a bundle folder of an earlier bump (before the birdbone.json mark) is bird-bone's too
    with atomic_dir(target, overwrite=(target / "bundle.json").is_file()) as tmp:
        (tmp / "bundle.json").write_text(json.dumps(bundle, indent=2, sort_keys=True) + "\n")
        (tmp / "params.diff").write_text(git(root, "diff", parent, sha, "--", "params.yaml", "conf") if parent else "")
        (tmp / "README.md").write_text(_summary_text(bundle))
    return target


_EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # git's empty tree


def _summary_text(bundle: dict[str, Any]) -> str:
    lines = [f"# {bundle['commit'][:12]}: {bundle['message']}", "", f"Parent: {bundle['parent'] or '(none)'}", ""]
    lines.append("## Settings changed")
    lines += [f"- `{p['key']}`: {p['before']!r} -> {p['after']!r}" for p in bundle["params"]] or ["- none"]
    masks = bundle["masks"]
    lines += ["", f"## Masks ({masks['model'] or 'no masked model'})"]
    lines.append(
        f"{masks['changed_layers']} layers changed: {masks['removed']} weights removed, {masks['revived']} revived"
    )
    lines += ["", "## Metrics"]
    lines += [f"- `{m['key']}`: {m['before']} -> {m['after']}" for m in bundle["metrics"]] or ["- none changed"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the weight-hash hook


def weight_problems(root: Path) -> list[str]:
    """What the pre-commit weight-hash hook refuses: a weight file under ``models/`` whose
    bytes differ from the SHA-256 its ``birdbone.json`` records (changed by hand after the
    stage wrote it), or a DVC-tracked model whose files differ from ``dvc.lock`` (changed
    without ``dvc commit`` / ``dvc repro``). Each problem names the file and the fix."""
    problems = []
    for sidecar in sorted((root / "models").rglob("birdbone.json")):
        recorded = json.loads(sidecar.read_text()).get("sha256", {})
        for name, digest in recorded.items():
            path = sidecar.parent / name
            if not path.is_file():
                problems.append(
                    f"{path.relative_to(root)} is missing: {sidecar.relative_to(root)} records it. "
                    "Fix: dvc checkout to restore it, or rerun the stage (dvc repro)."
                )
            elif sha256_file(path) != digest:
                problems.append(
                    f"{path.relative_to(root)} differs from the SHA-256 in {sidecar.relative_to(root)}: it was "
                    "changed after the stage wrote it. Fix: rerun the stage (dvc repro), or dvc checkout to restore it."
                )
    if (root / "dvc.lock").is_file() and (root / ".dvc").is_dir():
        done = run_dvc(root, "status", "--json")
        if done.returncode:
            raise DiffError(
                f"dvc status failed in {root}: {(done.stderr or done.stdout).strip()[-500:]}. "
                "Fix: check the DVC set-up (dvc doctor), then commit again."
            )
        status = json.loads(done.stdout or "{}")
        for stage, changes in status.items():
            for change in changes if isinstance(changes, list) else []:
                for path, state in (change.get("changed outs") or {}).items() if isinstance(change, dict) else []:
                    if str(path).startswith("models") and state in ("modified", "deleted"):
                        problems.append(
                            f"{path} (stage {stage}) differs from what dvc.lock records. Fix: dvc commit {stage} "
                            "(or dvc repro) and git add dvc.lock, or dvc checkout to restore it."
                        )
    return problems
