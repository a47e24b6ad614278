"""Kedro's config loader, with the recipe read from one file when a run names it.

``kedro run --params recipe_file=params.yaml`` (what ``dvc.yaml``'s stages run) takes the
parameters from that file, the whole validated recipe ``birdbone params`` wrote, instead of
conf/base with conf/<env> over it; any other ``--params`` still win over it. So under DVC,
params.yaml is the one source of truth: ``dvc exp run -S decay.pattern.sparsity=0.4`` or a
hand edit of params.yaml is what the stages run, and a change to conf/ reaches it through
the ``params`` stage (which rewrites params.yaml from conf/ whenever conf/ changes). Plain
``kedro run`` reads conf/ as always."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from kedro.config import OmegaConfigLoader
from omegaconf import OmegaConf

from birdbone.errors import ConfigError

RECIPE_FILE = "recipe_file"
MAX_BYTES = 1 << 20  # a recipe is a few KiB; a larger file is not one


def read_recipe_file(path: Path, root: Path) -> dict[str, Any]:
    """The recipe in ``path`` (a ``birdbone params`` file) as parameters, or a ConfigError
    naming the problem: a path outside ``root`` (or a link out of it), a missing, oversized
    or non-YAML file, or one that is not a mapping of sections."""
    fix = "Fix: birdbone params --env ENV --out params.yaml writes it from conf/."
    full = (root / path).resolve() if not path.is_absolute() else path.resolve()
    if not full.is_relative_to(root.resolve()):
        raise ConfigError(f"recipe_file {path} is outside the project {root}. Fix: a file in the project root.")
    if not full.is_file():
        raise ConfigError(f"recipe_file {path}: no such file. {fix}")
    if full.stat().st_size > MAX_BYTES:
        raise ConfigError(f"recipe_file {path} is {full.stat().st_size:,} bytes, not a recipe (at most 1 MiB). {fix}")
    try:
        recipe = yaml.safe_load(full.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe_file {path} is not readable YAML ({exc}). {fix}") from None
    if not isinstance(recipe, dict) or not all(isinstance(k, str) for k in recipe):
        raise ConfigError(f"recipe_file {path} holds a {type(recipe).__name__}, not a mapping of sections. {fix}")
    recipe.pop("env", None)  # which env birdbone params made it from: not a setting
    return recipe


# The config loader of the context being made: ``register_pipelines`` reads the decay
# settings through it (env and --params included) to know how many waves to register.
_ACTIVE: dict[str, Any] = {}


def activate(loader: Any) -> None:
    """Makes ``loader`` the one the pipelines are sized from."""
    _ACTIVE["config_loader"] = loader


def active_config_loader() -> Any:
    """The config loader of the last Kedro context made, or None."""
    return _ACTIVE.get("config_loader")


class RecipeConfigLoader(OmegaConfigLoader):
    """``OmegaConfigLoader``; with the runtime parameter ``recipe_file``, the parameters
    are that file's recipe with the other runtime parameters over it. Each one made becomes
    the active loader, so the pipelines match the env being loaded even where no hooks run
    (``kedro viz run --env test`` draws the test env's waves)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        activate(self)

    def recipe_file(self) -> Path | None:
        name = (self.runtime_params or {}).get(RECIPE_FILE)
        return Path(str(name)) if name else None

    def __getitem__(self, key: str) -> dict[str, Any]:
        path = self.recipe_file()
        if key != "parameters" or path is None:
            return super().__getitem__(key)
        root = Path(self.conf_source).resolve().parent
        recipe = read_recipe_file(path, root)
        others = {k: v for k, v in (self.runtime_params or {}).items() if k != RECIPE_FILE}
        merged = OmegaConf.merge(OmegaConf.create(recipe), OmegaConf.create(others))
        return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]
