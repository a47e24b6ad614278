"""Kedro project settings."""

import sys
import warnings

from birdbone.errors import BirdboneError
from birdbone.hooks import RecipeHook, TrackingHook

_recipe_hook = RecipeHook()
HOOKS = (_recipe_hook, TrackingHook(_recipe_hook))

CONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local"}

# Kedro's own use of a deprecated OmegaConf call; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)

_previous_excepthook = sys.excepthook


def _excepthook(kind, error, trace):  # noqa: ANN001
    """A bad-input error is shown as its message (which names the fix), not a traceback."""
    if isinstance(error, BirdboneError):
        sys.stderr.write(f"\nbird-bone stopped: {type(error).__name__}\n{error}\n")
        return
    _previous_excepthook(kind, error, trace)


sys.excepthook = _excepthook
