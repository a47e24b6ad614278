"""The configuration reference (``docs/configuration.md``), made from the Pydantic classes
that validate a recipe, so it cannot go stale: every key, its type and bounds, the value
``conf/base`` gives it (defaults filled in), and what it does (the comment beside it in
``conf/base/parameters_<section>.yml``, else the class's docstring).

``birdbone config-docs`` writes it; a test checks that the committed page is current.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from birdbone.config import Recipe

HEADER = (
    "# Configuration reference\n\n"
    "Written by `birdbone config-docs` from the Pydantic classes in `src/birdbone/config.py`\n"
    "and the comments in `conf/base/`; a test fails when it is not current. `base` is the\n"
    "value a plain `kedro run` uses (conf/base, every default filled in). Set a key in\n"
    "`conf/local/parameters_<section>.yml`, an env of your own, or `kedro run --params key=value`;\n"
    "the whole recipe is validated before anything runs.\n"
)
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][A-Za-z0-9_]*):(?P<rest>.*)$")


def yaml_comments(path: Path) -> dict[str, str]:
    """Dotted key -> the comment on its line in a parameters file (block YAML as conf/ writes it)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        match = _KEY.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        comment = re.split(r"\s#\s?", " " + match["rest"], maxsplit=1)[1:]
        if comment and comment[0].strip():
            out[".".join(k for _, k in stack)] = comment[0].strip()
    return out


def source_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment beside it in the class's source (``name: type = x  # ...``)."""
    try:
        lines = inspect.getsource(model).splitlines()
    except (OSError, TypeError):
        return {}
    out = {}
    for line in lines:
        match = re.match(r"^    (?P<name>[a-z_][a-z0-9_]*): [^#]*#\s*(?P<comment>.+)$", line)
        if match:
            out[match["name"]] = match["comment"].strip()
    return out


def _bounds(metadata: list[Any]) -> str:
    parts = []
    for item in metadata:
        for name, sign in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            value = getattr(item, name, None)
            if value is not None:
                parts.append(f"{sign} {value}")
        for inner in getattr(item, "metadata", []) or []:
            parts.append(_bounds([inner]))
    return ", ".join(p for p in parts if p)


def type_text(annotation: Any) -> str:
    """A short, readable form of a field's type: ``int (>= 2, <= 8)``, ``rtn | gptq``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        inner, *meta = args
        bounds = _bounds(meta)
        return type_text(inner) + (f" ({bounds})" if bounds else "")
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else type_text(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join(type_text(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        kind = annotation.model_fields.get("kind")
        if kind is not None and typing.get_origin(kind.annotation) is typing.Literal:
            return "{kind: " + " | ".join(typing.get_args(kind.annotation)) + ", ...}"
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The models a field's value may be (through Annotated, unions, lists)."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if origin is None:
        return []
    return [m for a in typing.get_args(annotation) for m in _models(a)]


def _value(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value).replace("'", "")
    return text if len(text) <= 60 else text[:57] + "..."


def _first_sentence(doc: str | None) -> str:
    """A docstring's first paragraph, on one line (at most 240 characters)."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    return text if len(text) <= 240 else text[:237] + "..."


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def field_type(field: Any) -> str:
    """``type_text`` of a field, with the bounds Pydantic moved into its metadata."""
    bounds = _bounds(list(field.metadata))
    return type_text(field.annotation) + (f" ({bounds})" if bounds else "")


def _rows(
    model: type[BaseModel], prefix: str, base: Any, comments: dict[str, str], seen: set[type]
) -> list[tuple[str, str, str, str]]:
    rows = []
    beside = source_comments(model)
    for name, field in model.model_fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if isinstance(base, dict):
            here = base.get(name)
        else:  # a variant the base recipe does not use: the class's own default
            here = "required" if field.is_required() else field.get_default(call_default_factory=True)
            here = here.model_dump(mode="json") if isinstance(here, BaseModel) else here
        models = _models(field.annotation)
        nested = [m for m in models if m not in seen and "kind" not in m.model_fields]
        inner_doc = _first_sentence(nested[0].__doc__) if len(nested) == 1 else ""
        doc = comments.get(key) or field.description or beside.get(name) or inner_doc
        if len(nested) == 1 and typing.get_origin(field.annotation) is not list:
            rows.append((key, field_type(field), "" if isinstance(here, dict) else _value(here), doc))
            rows += _rows(nested[0], key, here, comments, seen | {nested[0]})
            continue
        rows.append((key, field_type(field), _value(here), doc))
        for variant in (m for m in models if "kind" in m.model_fields and m not in seen):
            kind = typing.get_args(variant.model_fields["kind"].annotation)
            label = f"{key}{{kind: {kind[0] if kind else '?'}}}"
            rows.append((label, "variant", "", _first_sentence(variant.__doc__)))
            inner = here if isinstance(here, dict) and here.get("kind") in kind else None
            inner = next((h for h in here if h.get("kind") in kind), None) if isinstance(here, list) else inner
            rows += [r for r in _rows(variant, label, inner, comments, seen | {variant}) if not r[0].endswith(".kind")]
    return rows


def reference(conf: Path, recipe: Recipe) -> str:
    """The reference page for ``recipe`` (validated from ``conf``'s base env)."""
    dump = recipe.model_dump(mode="json")
    parts = [HEADER]
    for section, field in Recipe.model_fields.items():
        file = conf / "base" / f"parameters_{section}.yml"
        comments = yaml_comments(file) if file.is_file() else {}
        models = _models(field.annotation)
        parts.append(f"\n## `{section}`\n")
        if models:
            parts.append(_first_sentence(models[0].__doc__) + "\n")
        source = f"`conf/base/{file.name}`" if file.is_file() else "no file in conf/base: the class defaults"
        parts.append(f"\nIn {source}.\n\n| key | type | base | what it does |\n| --- | --- | --- | --- |\n")
        here = dump.get(section)
        rows = _rows(models[0], section, here, comments, {models[0]}) if models else []
        for key, kind, value, doc in rows:
            parts.append(f"| `{_cell(key)}` | {_cell(kind)} | {_cell(value)} | {_cell(doc)} |\n")
    return "".join(parts)
