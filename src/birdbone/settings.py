"""Kedro project settings."""

import warnings

from kedro.framework.session import KedroSession

from birdbone import runstate
from birdbone.configloader import RecipeConfigLoader
from birdbone.errors import install_excepthook
from birdbone.hooks import MemoryHook, RecipeHook, RunStateHook, SummaryHook, TrackingHook

_recipe_hook = RecipeHook()
_memory_hook = MemoryHook(_recipe_hook)
_tracking_hook = TrackingHook(_recipe_hook, _memory_hook)
HOOKS = (
    _recipe_hook,
    RunStateHook(_recipe_hook),
    _memory_hook,
    _tracking_hook,
    SummaryHook(_recipe_hook, _tracking_hook),
)


class ResumingSession(KedroSession):
    """``kedro run`` resumes: a step whose persisted outputs this recipe already wrote whole
    is skipped (Kedro's ``--only-missing-outputs``, made the default). What counts as
    written is the run journal's call (``birdbone.runstate``): a changed recipe, or a file
    replaced since, is made again; ``run.resume: false`` redoes everything.

    A run stopped by Ctrl-C or SIGTERM (which Kedro's hooks never hear of: it is no
    ``Exception``) is told to the hooks' ``on_interrupt``: the MLflow run ends KILLED, the
    temporary files go and the lock is released, then the interruption goes on up."""

    def run(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        kwargs["only_missing_outputs"] = True
        with runstate.sigterm_as_interrupt():
            try:
                return super().run(*args, **kwargs)
            except BaseException as stop:
                if not isinstance(stop, Exception):  # KeyboardInterrupt (SIGINT, SIGTERM), SystemExit
                    for hook in HOOKS:
                        if hasattr(hook, "on_interrupt"):
                            hook.on_interrupt(stop)
                raise


SESSION_CLASS = ResumingSession

CONFIG_LOADER_CLASS = RecipeConfigLoader  # --params recipe_file=params.yaml: the recipe from that file (DVC)
CONFIG_LOADER_ARGS = {"base_env": "base", "default_run_env": "local"}

# Kedro's own use of a deprecated OmegaConf call; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"register_new_resolver\(\) is deprecated", category=UserWarning)

install_excepthook()
