"""Project hooks: the recipe is validated before anything runs, one run at a time holds
the project (``birdbone.runstate``: the lock and the resume journal), and MLflow tracks
each run.

Tracking lives here and only here: nodes return metrics (outputs named ``*_metrics``),
this hook logs them. A tracking failure is reported once and never stops the compression.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from birdbone import runstate
from birdbone.config import Recipe, TrackingConfig, validate_recipe
from birdbone.configloader import activate
from birdbone.core import memory
from birdbone.core.io import check_replaceable, flatten, write_json_atomic
from birdbone.errors import ConfigError, OutputError, install_excepthook

log = logging.getLogger(__name__)

REPORTS = "data/08_reporting"


def _conf_dirs(context: Any) -> list[Path]:
    """Where the parameters came from, base first: the conf folders, or the recipe file."""
    loader = context.config_loader
    named = loader.recipe_file() if hasattr(loader, "recipe_file") else None
    if named is not None:
        return [Path(context.project_path) / named]
    root = Path(loader.conf_source)
    envs = [loader.base_env, context.env or loader.default_run_env]
    return [root / env for env in envs if env and (root / env).is_dir()]


class RecipeHook:
    """Validates the whole recipe as soon as the context exists, before any node runs."""

    recipe: Recipe | None = None
    root: Path | None = None

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        activate(context.config_loader)  # before anything loads the pipelines
        install_excepthook()  # again: Kedro's default logging (outside the root) installs rich's since
        root = self.root = Path(context.project_path).resolve()
        if Path.cwd().resolve() != root:
            raise ConfigError(
                f"bird-bone runs from the project root ({root}), but the working directory is {Path.cwd()}: "
                "the recipe's relative paths (data sources, task files) are read from the project root. "
                f"Fix: cd {root} first."
            )
        overrides = getattr(context, "_runtime_params", None) or {}
        self.recipe = validate_recipe(context.params, root, _conf_dirs(context), overrides)
        log.info("recipe valid (hash %s)", self.recipe.hash()[:12])


def _output_datasets(pipeline: Any, catalog: Any) -> list[Any]:
    """The catalog datasets of the pipeline's outputs that are persisted at a path."""
    names = pipeline.outputs() | {o for n in pipeline.nodes for o in n.outputs}
    datasets = [catalog.get(name, fallback_to_runtime_pattern=True) for name in names if name in catalog]
    return [d for d in datasets if getattr(d, "_path", None) is not None]


def _output_dirs(pipeline: Any, catalog: Any) -> list[Path]:
    """The folders the pipeline's persisted outputs go into (each dataset's parent)."""
    return sorted({Path(d._path).parent for d in _output_datasets(pipeline, catalog)})


def _replaced_folders(pipeline: Any, catalog: Any, recipe: Recipe) -> list[Path]:
    """The folders the run replaces whole: its model and wave datasets, and the export folder."""
    folders = {Path(d._path) for d in _output_datasets(pipeline, catalog) if getattr(d, "replaces_folder", False)}
    if any(node.name.startswith("export") for node in pipeline.nodes):
        folders.add(Path(recipe.export.path))
    return sorted(folders)


def check_writable(directories: list[Path]) -> None:
    """Creates each output folder and writes (then removes) a probe file in it, so a
    read-only or full file system is named before any compute rather than after it."""
    for directory in directories:
        probe = directory / f".birdbone-probe-{os.getpid()}"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as handle:
                handle.write(b"probe")
        except OSError as exc:
            raise OutputError(runstate.explain_write_error(exc, directory)) from None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()


class RunStateHook:
    """Holds the project's run lock from the first node to the end of the run, sweeps the
    temporary files a killed run left, and keeps the resume journal (``birdbone.runstate``).

    Its ``before_pipeline_run`` goes first, so a refused run starts no MLflow run."""

    def __init__(self, recipe_hook: RecipeHook) -> None:
        self._recipe_hook = recipe_hook
        self._lock: runstate.RunLock | None = None

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        recipe, root = self._recipe_hook.recipe, self._recipe_hook.root
        if recipe is None or root is None:
            return
        lock = runstate.RunLock(root)
        try:
            lock.acquire(env=run_params.get("env"), pipelines=run_params.get("pipeline_names"))
        except PermissionError as exc:
            raise OutputError(runstate.explain_write_error(exc, lock.path.parent)) from None
        self._lock = lock
        try:
            swept = runstate.sweep_temporaries(root)
            if swept:
                log.warning(
                    "removed %d temporary file(s) an interrupted run left: %s",
                    len(swept),
                    ", ".join(str(p.relative_to(root)) for p in swept[:5]),
                )
            for folder in _replaced_folders(pipeline, catalog, recipe):  # first: the probe makes folders
                check_replaceable(folder)
            check_writable(_output_dirs(pipeline, catalog))
            resume = bool(run_params.get("only_missing_outputs")) and recipe.run.resume
            journal = runstate.Journal(root, recipe.hash(), resume)
            runstate.activate(journal)
            if resume:
                log.info("resume on: steps this recipe already finished are skipped (run.resume: false redoes them)")
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        runstate.activate(None)
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._release()

    @hook_impl(trylast=True)
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._release()

    def on_interrupt(self, stop: BaseException) -> None:
        """Ctrl-C or SIGTERM: the temporary files go (while the lock is still held), then the lock."""
        root = self._recipe_hook.root
        if self._lock is not None and root is not None:
            with contextlib.suppress(OSError):
                swept = runstate.sweep_temporaries(root)
                if swept:
                    log.warning("interrupted: removed %d temporary file(s)", len(swept))
        self._release()


def stage_of(node: Any) -> str:
    """The stage a node belongs to: the pipelines package of its function
    (``birdbone.pipelines.heal.nodes`` -> ``heal``)."""
    parts = getattr(getattr(node, "func", None), "__module__", "").split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["birdbone", "pipelines"] else "other"


class MemoryHook:
    """What each node cost: peak RSS (and peak GPU memory on CUDA) of each stage, from its
    nodes' peaks, and the timeline of the recipe's nodes (wall seconds of each).

    Both are kept after every node in ``.birdbone/memory.json`` under the recipe's hash (so
    the nodes a killed run finished keep theirs when it resumes: the timeline is that of the
    runs that made the artifacts, each node's last run counting), written to
    ``summary.json`` (``memory``, ``timeline``) when the run succeeds (a failed run leaves
    the last summary as it was), drawn in ``data/08_reporting/timeline.png``, logged by
    stage, and the peaks sent to MLflow by the tracking hook (``memory.<stage>.peak_rss_mb``)."""

    def __init__(self, recipe_hook: RecipeHook) -> None:
        self._recipe_hook = recipe_hook
        self.stages: dict[str, dict[str, Any]] = {}
        self._earlier_stages: dict[str, Any] = {}  # read once a run, from .birdbone/memory.json
        self.timeline: list[dict[str, Any]] = []  # this run's nodes, in the order they ran
        self._earlier_nodes: list[dict[str, Any]] = []
        self._started = 0.0
        self._node_started = 0.0

    def _path(self) -> Path | None:
        root = self._recipe_hook.root
        return None if root is None else root / runstate.STATE_DIR / "memory.json"

    def _earlier(self) -> dict[str, Any]:
        """This recipe's stage peaks and node times from earlier (killed or partial) runs."""
        path, recipe = self._path(), self._recipe_hook.recipe
        try:
            old = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        except ValueError:
            old = {}
        return old if isinstance(old, dict) and recipe is not None and old.get("recipe_hash") == recipe.hash() else {}

    def nodes(self) -> list[dict[str, Any]]:
        """The recipe's nodes with their seconds: earlier runs' that this run did not redo,
        then this run's."""
        redone = {n["node"] for n in self.timeline}
        return [n for n in self._earlier_nodes if n["node"] not in redone] + self.timeline

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self.stages, self.timeline = {}, []
        earlier = self._earlier()
        self._earlier_stages = earlier.get("stages", {})
        self._earlier_nodes = [n for n in earlier.get("nodes", []) if isinstance(n, dict) and "node" in n]
        self._started = time.perf_counter()

    @hook_impl
    def before_node_run(self, node: Any) -> None:
        memory.reset_peak()
        self._node_started = time.perf_counter()

    @hook_impl
    def after_node_run(self, node: Any) -> None:
        seconds = round(time.perf_counter() - self._node_started, 2)
        self.timeline.append({"node": node.name, "stage": stage_of(node), "seconds": seconds})
        peak = memory.peak()
        entry = self.stages.setdefault(stage_of(node), {"peak_rss_mb": 0.0, "per_stage": peak.resettable})
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], round(peak.rss_bytes / 2**20, 1))
        if peak.gpu_bytes is not None:
            entry["peak_gpu_mb"] = max(entry.get("peak_gpu_mb", 0.0), round(peak.gpu_bytes / 2**20, 1))
        path, recipe = self._path(), self._recipe_hook.recipe
        if path is not None and recipe is not None:
            stages = {**self._earlier_stages, **self.stages}
            write_json_atomic(path, {"recipe_hash": recipe.hash(), "stages": stages, "nodes": self.nodes()})

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        recipe, root = self._recipe_hook.recipe, self._recipe_hook.root
        if recipe is None or root is None:
            return
        stages = {**self._earlier_stages, **self.stages}
        overhead = time.perf_counter() - self._started - sum(n["seconds"] for n in self.timeline)
        timeline = timeline_summary(self.nodes(), overhead)
        if self.stages:
            mine = timeline_summary(self.timeline)["stage_seconds"]
            log.info(
                "time and peak memory by stage, this run: %s",
                ", ".join(
                    f"{stage} {mine.get(stage, 0):.0f} s, {entry['peak_rss_mb']:.0f} MiB"
                    + (f" (GPU {entry['peak_gpu_mb']:.0f} MiB)" if "peak_gpu_mb" in entry else "")
                    for stage, entry in self.stages.items()
                ),
            )
        if self.timeline:  # a run that redid nothing leaves summary.json (a DVC output) as it was
            from birdbone.core.io import write_bytes_atomic
            from birdbone.core.plots import png_bytes, timeline_figure
            from birdbone.datasets import merge_json

            # not recorded in the run journal: summary.json counts as written by the nodes that own it
            update: dict[str, Any] = {"recipe_hash": recipe.hash(), "timeline": timeline}
            if stages:
                update["memory"] = stages
            merge_json(root / REPORTS / "summary.json", update)
            if timeline["nodes"]:
                write_bytes_atomic(root / REPORTS / "timeline.png", png_bytes(timeline_figure(timeline)))


EXPERIMENT_KIND = "mlflow.experimentKind"
MODEL_DEVELOPMENT = "custom_model_development"


def run_name(run_params: dict[str, Any]) -> str:
    """The pipelines a ``kedro run`` ran (Kedro 1.x: ``pipeline_names``; 0.19: ``pipeline_name``)."""
    names = run_params.get("pipeline_names") or [run_params.get("pipeline_name")]
    names = [n for n in names if n and n != "__default__"]
    return "+".join(names) if names else "all stages"


def numbers_of(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a (nested) metrics dict, flattened to dotted keys; booleans left out."""
    return {k: float(v) for k, v in flatten(metrics).items() if isinstance(v, int | float) and not isinstance(v, bool)}


def git_tags(root: Path) -> dict[str, str]:
    """MLflow's source tags of the project's git checkout (commit, branch), if it is one."""
    import subprocess

    tags = {}
    for tag, args in (
        ("mlflow.source.git.commit", ["rev-parse", "HEAD"]),
        ("mlflow.source.git.branch", ["branch", "--show-current"]),
    ):
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return tags
        if out.returncode == 0 and out.stdout.strip():
            tags[tag] = out.stdout.strip()
    return tags


def text_datasets(recipe: Recipe, root: Path) -> list[tuple[Any, str]]:
    """The recipe's text sources as MLflow dataset inputs (metadata only: where, what, a
    digest of the source's settings and each file's size and mtime), with their context."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from birdbone.core.io import sha256_json

    out = []
    for sources, context in ((recipe.data.sources, "text"), (recipe.data.general.sources, "general")):
        for source in sources:
            spec = source.model_dump(mode="json")
            path = getattr(source, "path", None)
            if path is not None:
                full = Path(path) if Path(path).is_absolute() else root / path
                files = sorted(full.rglob("*")) if full.is_dir() else [full]
                stats = [
                    (str(f.relative_to(full)) if full.is_dir() else f.name, f.stat().st_size, f.stat().st_mtime_ns)
                    for f in files
                    if f.is_file() and not f.is_symlink()
                ]
                origin = resolve_dataset_source(str(full))
                name = f"{source.kind}:{path}"
            else:
                stats, origin, name = [], CodeDatasetSource({k: str(v) for k, v in spec.items()}), source.kind
            digest = sha256_json({"spec": spec, "files": stats})[:16]
            out.append((MetaDataset(origin, name=name, digest=digest), context))
    return out


def timeline_summary(nodes: list[dict[str, Any]], overhead: float = 0.0) -> dict[str, Any]:
    """A timeline of ``nodes`` (run one at a time, as Kedro's sequential runner does): by
    node name, in the order they ran, its stage, start (the seconds of the nodes before it)
    and seconds; the seconds of each stage (in the order the stages first ran); and the wall
    seconds in all: the nodes' and ``overhead`` (the run's time outside nodes: loading the
    session, checks, tracking)."""
    stages: dict[str, float] = {}
    out, start = {}, 0.0
    for node in nodes:
        out[node["node"]] = {"stage": node["stage"], "start_seconds": round(start, 2), "seconds": node["seconds"]}
        start += node["seconds"]
        stages[node["stage"]] = round(stages.get(node["stage"], 0.0) + node["seconds"], 2)
    return {"total_seconds": round(start + max(overhead, 0.0), 2), "stage_seconds": stages, "nodes": out}


# MLflow's HTTP client retries 7 times over about four minutes by default; a run waits for
# it at the first call. Users who want that set these variables themselves.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingHook:
    """One MLflow run per ``kedro run``: the validated recipe as params, node metrics,
    each stage's peak memory, the reports as artifacts, and the status FAILED when the
    pipeline fails."""

    def __init__(self, recipe_hook: RecipeHook, memory_hook: MemoryHook | None = None) -> None:
        self._recipe_hook = recipe_hook
        self._memory_hook = memory_hook
        self._mlflow: Any = None
        self._root = Path.cwd()
        self._config = TrackingConfig()
        self._env = ""
        self._broken = False
        self._started = time.time()
        self.run: dict[str, str] | None = None  # the last run: id, experiment_id, uri (for the closing summary)

    @hook_impl
    def after_context_created(self, context: Any) -> None:
        self._root = Path(context.project_path)
        self._env = context.env or context.config_loader.default_run_env

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        if self._mlflow is None or self._broken:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # tracking must never stop the compression
            self._broken = True
            log.error(
                "MLflow tracking failed while trying to %s (%s: %s); the run goes on untracked.",
                what,
                type(exc).__name__,
                exc,
            )
            return None

    def tracking_uri(self) -> str:
        """The store URI with a relative sqlite/file path made absolute under the project."""
        uri = self._config.uri
        for scheme in ("sqlite:///", "file:"):
            if uri.startswith(scheme):
                path = Path(uri[len(scheme) :])
                if not path.is_absolute():
                    return scheme + str(self._root / path)
        return uri if "://" in uri else str(self._root / uri)

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        recipe = self._recipe_hook.recipe
        if recipe is None or not recipe.tracking.enabled:
            return
        self._config = recipe.tracking
        for name, value in HTTP_DEFAULTS.items():  # a server that is down costs seconds, not minutes
            os.environ.setdefault(name, value)
        try:
            import mlflow
        except ImportError:  # pragma: no cover - mlflow is a dependency
            log.error("MLflow is not installed; tracking is off.")
            return
        self._mlflow = mlflow
        self._broken = False
        self._started = time.time()
        self._call("set the tracking store", mlflow.set_tracking_uri, self.tracking_uri())
        experiment = self._call("set the experiment", mlflow.set_experiment, self._config.experiment)
        if experiment is not None and EXPERIMENT_KIND not in (experiment.tags or {}):
            # MLflow 3 opens an experiment without a kind in its GenAI view
            self._call("set the experiment's kind", mlflow.set_experiment_tag, EXPERIMENT_KIND, MODEL_DEVELOPMENT)
        name = run_name(run_params)
        self.run = None
        active = self._call("start a run", mlflow.start_run, run_name=f"{name} ({self._env})")
        if active is not None:
            self.run = {"id": active.info.run_id, "experiment_id": active.info.experiment_id, "uri": self._config.uri}
        params = {k: str(v)[:6000] for k, v in flatten(recipe.model_dump(mode="json")).items()}
        self._call("log the recipe", mlflow.log_params, params)
        tags = {"birdbone.pipeline": name, "birdbone.env": self._env, "birdbone.recipe_hash": recipe.hash()}
        tags.update(git_tags(self._root))
        self._call("tag the run", mlflow.set_tags, tags)
        for dataset, context in self._call("describe the text sources", text_datasets, recipe, self._root) or []:
            self._call(f"log the input {dataset.name}", mlflow.log_input, dataset, context=context)

    @hook_impl
    def after_node_run(self, node: Any, outputs: dict[str, Any]) -> None:
        """Logs every output named ``*_metrics``: its numbers as metrics (at ``step`` when
        it has one: a wave's index), its ``tags`` as run tags, its ``series`` (metric name ->
        list of (step, value), e.g. a healing curve) one point per step, and its ``child``
        (``name``, ``metrics``, ``tags``, ``series``: a wave) as a nested run of its own."""
        if self._mlflow is None:
            return
        for name, value in outputs.items():
            if name.endswith("_metrics") and isinstance(value, dict):
                value = dict(value)
                step, tags = value.pop("step", None), value.pop("tags", None) or {}
                child = value.pop("child", None)
                for metric, points in (value.pop("series", None) or {}).items():
                    for point_step, point in points:
                        self._call(f"log {metric}", self._mlflow.log_metric, metric, float(point), step=int(point_step))
                self._call(f"log {name}", self._mlflow.log_metrics, numbers_of(value), step=step)
                if tags:
                    self._call(f"tag {name}", self._mlflow.set_tags, tags)
                if child:
                    self._call(f"log {child['name']} as a nested run", self._child_run, child)

    def _child_run(self, child: dict[str, Any]) -> None:
        """A nested run under this one (MLflow's parent tag), written through the client
        so the active run stays the parent."""
        from mlflow.entities import Metric
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        parent = self._mlflow.active_run()
        client = self._mlflow.MlflowClient()
        tags = {
            MLFLOW_PARENT_RUN_ID: parent.info.run_id,
            **{k: str(v)[:5000] for k, v in child.get("tags", {}).items()},
        }
        run = client.create_run(parent.info.experiment_id, run_name=child["name"], tags=tags)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in numbers_of(child.get("metrics", {})).items()]
        metrics += [
            Metric(key, float(point), now, int(point_step))
            for key, points in (child.get("series") or {}).items()
            for point_step, point in points
        ]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit
            client.log_batch(run.info.run_id, metrics=metrics[start : start + 1000])
        client.set_terminated(run.info.run_id, "FINISHED")

    @hook_impl
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        stages = self._memory_hook.stages if self._memory_hook is not None else {}
        numbers = {
            f"memory.{stage}.{key}": float(value)
            for stage, entry in stages.items()
            for key, value in entry.items()
            if key.startswith("peak_")
        }
        if numbers and self._mlflow is not None:
            self._call("log peak memory", self._mlflow.log_metrics, numbers)
        reports = self._root / REPORTS
        if self._mlflow is not None and reports.is_dir():
            for path in sorted(reports.glob("*")):  # what this run wrote, not what an earlier one left
                if path.is_file() and path.suffix in {".json", ".png"} and self._written(path):
                    self._call(f"store {path.name}", self._mlflow.log_artifact, str(path))
        export = self._root / "models/export"
        if self._mlflow is not None and self._config.log_model and self._written(export / "model.gguf"):
            self._call("store the exported model.gguf", self._mlflow.log_artifact, str(export / "model.gguf"), "model")
            if (export / "hf").is_dir():
                self._call("store the exported hf/", self._mlflow.log_artifacts, str(export / "hf"), "model/hf")
        self._end("FINISHED")

    def _written(self, path: Path) -> bool:
        """Whether this run wrote ``path`` (a link is never followed out)."""
        return path.is_file() and not path.is_symlink() and path.stat().st_mtime >= self._started - 1

    @hook_impl
    def on_pipeline_error(self, error: Exception, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        if self._mlflow is not None:
            self._call(
                "record the error", self._mlflow.set_tag, "birdbone.error", f"{type(error).__name__}: {error}"[:5000]
            )
        self._end("FAILED")

    def on_interrupt(self, stop: BaseException) -> None:
        """Ctrl-C or SIGTERM: the MLflow run ends KILLED (MLflow's status for a stopped run)."""
        if self._mlflow is not None:
            self._call("record the stop", self._mlflow.set_tag, "birdbone.error", f"interrupted: {stop or 'Ctrl-C'}")
        self._end("KILLED")

    def _end(self, status: str) -> None:
        if self._mlflow is not None:
            if self._broken:  # already reported: close the run locally, quietly
                with contextlib.suppress(Exception):
                    self._mlflow.end_run(status=status)
            else:
                self._call(f"end the run as {status}", self._mlflow.end_run, status=status)
        self._mlflow = None


# the model folders a run can leave, last stage first (the export's files come from summary.json)
MODEL_DIRS = ("models/quantized", "models/healed", "models/decayed", "models/baseline")


class SummaryHook:
    """The end of ``kedro run``: what it made and how good it is, in a few lines
    (``core.report.closing_lines``): the files this run wrote (the GGUF first) and their
    sizes, perplexity against dense in-domain and on the general split, llama.cpp's decode
    speed against dense F16, the waves' decisions, the MLflow run and how to open it."""

    def __init__(self, recipe_hook: RecipeHook, tracking_hook: TrackingHook | None = None) -> None:
        self._recipe_hook = recipe_hook
        self._tracking_hook = tracking_hook
        self._started = time.time()

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        self._started = time.time()

    def written(self, root: Path, summary: dict[str, Any]) -> list[str]:
        """The artifacts this run wrote, relative to ``root``: the exports (GGUF first), then
        the last model folder."""
        exports = sorted(summary.get("exports") or [], key=lambda e: e.get("format") != "gguf")
        candidates = [str(e["path"]) for e in exports if e.get("path")] + list(MODEL_DIRS)
        out: list[str] = []
        for rel in candidates:
            path = root / rel
            mark = path / "birdbone.json" if path.is_dir() else path
            if mark.is_file() and not mark.is_symlink() and mark.stat().st_mtime >= self._started - 1:
                if rel in MODEL_DIRS and any(r in MODEL_DIRS for r in out):
                    continue  # one model folder: the last stage's
                out.append(rel)
        return out

    @hook_impl(trylast=True)
    def after_pipeline_run(self, run_params: dict[str, Any], pipeline: Any, catalog: Any) -> None:
        from birdbone.core.report import closing_lines

        root = self._recipe_hook.root
        path = None if root is None else root / REPORTS / "summary.json"
        try:
            summary = json.loads(path.read_text(encoding="utf-8")) if path is not None else None
            changed = path is not None and path.stat().st_mtime >= self._started - 1
        except (OSError, ValueError):
            return  # none, or unreadable: birdbone report names the problem; the run itself succeeded
        if not isinstance(summary, dict):  # none, or not the object of sections a run writes
            return
        written = self.written(root, summary)
        if changed:
            from birdbone.core.report import write_views

            write_views(root, summary)  # metrics.json, waves.csv, heal.csv: what DVC's metrics and plots read
        run = self._tracking_hook.run if self._tracking_hook is not None else None
        minutes = (time.time() - self._started) / 60
        head = f"bird-bone: done in {minutes:.1f} min." + ("" if written else " Nothing new was written (resumed).")
        log.info("%s\n%s", head, "\n".join(closing_lines(summary, root, written, run)))
