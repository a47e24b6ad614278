"""Kedro project settings."""

import sys
import warnings

from kedro.framework.session import KedroSession

from birdbone.errors import BirdboneError
from birdbone.hooks import MemoryHook, RecipeHook, RunStateHook, TrackingHook

_recipe_hook = RecipeHook()
_memory_hook = MemoryHook(_recipe_hook)
HOOKS = (_recipe_hook, RunStateHook(_recipe_hook), _memory_hook, TrackingHook(_recipe_hook, _memory_hook))


class ResumingSession(KedroSession):
    """``kedro run`` resumes: a step whose persisted outputs this recipe already wrote whole
    is skipped (Kedro's ``--only-missing-outputs``, made the default). What counts as
    written is the run journal's call (``birdbone.runstate``): a changed recipe, or a file
    replaced since, is made again; ``run.resume: false`` redoes everything."""

    def run(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        kwargs["only_missing_outputs"] = True
        return super().run(*args, **kwargs)


SESSION_CLASS = ResumingSession

CONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local"}

# Kedro's own use of a deprecated OmegaConf call; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)

_previous_excepthook = sys.excepthook


def _excepthook(kind, error, trace):  # noqa: ANN001
    """A bad-input error is shown as its message (which names the fix), not a traceback,
    also when Kedro wrapped it (a dataset's save fails as a ``DatasetError``)."""
    cause, seen = error, set()
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, BirdboneError):
            sys.stderr.write(f"\nbird-bone stopped: {type(cause).__name__}\n{cause}\n")
            return
        seen.add(id(cause))
        cause = cause.__cause__
    _previous_excepthook(kind, error, trace)


sys.excepthook = _excepthook
