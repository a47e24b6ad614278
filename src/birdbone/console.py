"""``birdbone``: commands beside ``kedro run`` (not ``cli.py``: Kedro reserves that module
of a project for its own CLI plugins).

    birdbone heal models/decayed --out models/healed-more [--env base] [--steps N] [--lr X]

    birdbone params [--env local] [--out params.yaml]
    birdbone bump [--rev HEAD] [--no-tag] [--no-push]
    birdbone check-weights                  # the pre-commit hook: weights match their recorded hashes
    birdbone report                         # the last run: a row per stage, report.md and report.png

    birdbone pack models/quantized models/quantized.pack [--strategy auto] [--overwrite]
    birdbone unpack models/quantized.pack models/restored [--overwrite]

``pack`` stores a model directory compactly, each tensor in the lossless encoding that
takes the fewest bytes (``core.export.pack``: gzip, run-length, sparse bitmask + values,
quantized codes + scales), and prints the ratio and milliseconds per strategy; ``unpack``
rebuilds the directory bit for bit.

``params`` writes the recipe ``kedro run --env ENV`` would run (conf/base with the env's
files over it), validated and with every default filled in, as one YAML file: the params
file ``dvc.yaml``'s stages depend on section by section, so that changing one setting
reruns only the stages downstream of it.

``bump`` writes the diff bundle of a commit, ``diffs/<sha>/`` (``core.diffs``: the settings
changed against the parent, the mask delta per layer, the metric deltas, the weights'
SHA-256), tags it ``model-v<N>`` and pushes the DVC outputs to the default remote (the
local directory ``.dvc-remote`` unless configured otherwise). The git hook
``scripts/hooks/post-commit`` (installed by the set-up) runs it, without the tag, for every
commit that changes ``dvc.lock``, ``params.yaml`` or ``conf/``.

``heal`` heals a model directory (its ``masks.safetensors`` kept) with the recipe's
``heal`` settings on the run's healing blocks. It runs unchanged under ``accelerate
launch`` (data parallel over the launched processes; the main process writes the result):

    accelerate launch --num_processes 4 -m birdbone.console heal models/decayed --out models/healed
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from birdbone.errors import BirdboneError

log = logging.getLogger("birdbone.console")


def _parameters(conf: Path, env: str) -> dict[str, Any]:
    from kedro.config import OmegaConfigLoader

    _check_env(conf, env)
    loader = OmegaConfigLoader(str(conf), base_env="base", default_run_env=env)
    return dict(loader["parameters"])


def _check_env(conf: Path, env: str) -> None:
    """The configuration folder and environment exist, or a ConfigError naming the ones there."""
    from birdbone.errors import ConfigError

    if not (conf / "base").is_dir():
        raise ConfigError(f"no {conf}/base. Fix: run it in the project root, or pass --conf.")
    if not (conf / env).is_dir():
        envs = sorted(p.name for p in conf.iterdir() if p.is_dir())
        raise ConfigError(f"no environment {env} in {conf} (there: {', '.join(envs)}). Fix: --env one of those.")


def _check_heal_args(args: argparse.Namespace) -> None:
    """Every heal argument checked before anything is loaded: each problem a named error."""
    import math

    from birdbone.core.io import OWNER_FILE, check_replaceable
    from birdbone.errors import ConfigError, ModelSourceError, TextSourceError

    model = args.model
    if not model.exists():
        raise ModelSourceError(f"no model at {model}. Fix: a bird-bone model directory, such as models/decayed.")
    if not model.is_dir() or not (model / OWNER_FILE).is_file():
        raise ModelSourceError(
            f"{model} is not a bird-bone model directory (no birdbone.json). "
            "Fix: a folder a stage wrote (models/decayed, models/waves/wave_3), not a file or another folder."
        )
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps {args.steps}: healing needs at least one step. Fix: --steps 1 or more.")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise ConfigError(f"--lr {args.lr}: the learning rate must be a positive number. Fix: --lr 1e-4, say.")
    if not args.blocks.is_file():
        raise TextSourceError(
            f"no token blocks at {args.blocks}. Fix: run the baseline first (kedro run --pipelines baseline), "
            "or --blocks the blocks.safetensors it wrote."
        )
    if args.out.resolve() == model.resolve():
        raise ConfigError(f"--out {args.out} is the model being healed. Fix: a new folder, such as {model}-healed.")
    check_replaceable(args.out, args.overwrite, hint=", pass --overwrite")


def _blocks(path: Path) -> dict[str, Any]:
    """The baseline's token blocks; a file that is not one is a named error."""
    import torch

    from birdbone.datasets import TensorsDataset
    from birdbone.errors import TextSourceError

    try:
        blocks = TensorsDataset(str(path)).load()
    except Exception as exc:
        raise TextSourceError(
            f"{path} is not a safetensors file of token blocks ({exc}). Fix: --blocks "
            "data/03_primary/blocks.safetensors, as the baseline wrote it."
        ) from exc
    missing = [k for k in ("healing", "validation", "test") if k not in blocks]
    bad = [
        k
        for k in ("healing", "validation", "test")
        if k in blocks and (blocks[k].dtype != torch.int64 or blocks[k].ndim != 2 or blocks[k].numel() == 0)
    ]
    if missing or bad:
        raise TextSourceError(
            f"{path} is not the baseline's token blocks (missing {missing or 'none'}, not 2-D token ids: "
            f"{bad or 'none'}). Fix: --blocks data/03_primary/blocks.safetensors, as the baseline wrote it."
        )
    return blocks


def heal(args: argparse.Namespace) -> int:
    """Heals ``args.model`` into ``args.out``; returns the exit status. Holds the project's
    run lock, so it never writes while a ``kedro run`` does."""
    from birdbone import runstate

    _check_heal_args(args)
    params = _parameters(args.conf, args.env)
    lock = runstate.RunLock(Path.cwd())
    lock.acquire(env=args.env, pipelines=["birdbone heal"])
    try:
        return _heal(args, params)
    finally:
        lock.release()


def _heal(args: argparse.Namespace, params: dict[str, Any]) -> int:
    import torch
    from accelerate import Accelerator

    from birdbone.config import HealConfig, RunConfig
    from birdbone.core import evaluate, modeling
    from birdbone.core.heal import check_heal, heal_
    from birdbone.core.io import write_json_atomic
    from birdbone.datasets import SIDECAR, ModelDataset, ModelRef, TensorsDataset

    config = HealConfig.model_validate({**params.get("heal", {}), "enabled": True})
    run = RunConfig.model_validate(params.get("run", {}))
    blocks = _blocks(args.blocks)
    cpu = run.device == "cpu" or not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu)
    device = accelerator.device
    modeling.prepare_runtime(run.model_copy(update={"device": "cpu" if cpu else "cuda"}))
    bundle = ModelDataset(str(args.model)).load()
    check_heal(bundle, config)
    live = config.distill_top_k is None  # the dense model's whole vocabulary, run beside the student
    source = args.dense if live else args.teacher
    teacher = None
    if config.distill > 0 and live and (args.dense / SIDECAR).is_file():
        teacher = ModelRef(args.dense).load().model
    elif config.distill > 0 and not live and args.teacher.is_file():
        teacher = TensorsDataset(str(args.teacher)).load()
    if config.distill > 0 and teacher is None:
        log.warning("no %s at %s: healing without distillation", "dense model" if live else "teacher logits", source)
        config = config.model_copy(update={"distill": 0.0})
    bundle.model.to(device)
    steps = args.steps if args.steps is not None else config.final.steps
    lr = args.lr if args.lr is not None else config.final.lr
    report = heal_(
        bundle,
        bundle.masks,
        blocks["healing"],
        config,
        steps,
        lr,
        teacher,
        blocks["validation"],
        device,
        desc="heal",
        accelerator=accelerator,
    )
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        test = evaluate.perplexity(bundle.model, blocks["test"], config.batch_size, device, "test")["ppl"]
        bundle.origin = {**bundle.origin, "heal": {"steps": report.steps, "lr": lr, "from": str(args.model)}}
        bundle.model.to("cpu")
        ModelDataset(str(args.out), overwrite=args.overwrite).save(bundle)
        summary = {**{k: v for k, v in report.to_json().items() if k != "curve"}, "ppl_test": test}
        summary["processes"] = accelerator.num_processes
        write_json_atomic(Path(args.out) / "heal.json", {**summary, "curve": report.curve})
        print(json.dumps(summary, indent=2))
    return 1 if report.stopped else 0


def params(args: argparse.Namespace) -> int:
    import yaml

    from birdbone.config import validate_recipe
    from birdbone.core.io import write_bytes_atomic
    from birdbone.errors import ConfigError

    conf = args.conf
    if args.out.is_dir():
        raise ConfigError(
            f"--out {args.out} is a folder; the recipe is one YAML file. Fix: --out {args.out}/params.yaml."
        )
    recipe = validate_recipe(_parameters(conf, args.env), Path.cwd(), [conf / "base", conf / args.env])
    text = "# written by `birdbone params --env {env}`: the recipe of conf/base + conf/{env}, defaults filled in\n"
    body = yaml.safe_dump({"env": args.env, **recipe.model_dump(mode="json")}, sort_keys=False)
    write_bytes_atomic(args.out, (text.format(env=args.env) + body).encode())
    return 0


def config_docs(args: argparse.Namespace) -> int:
    from birdbone.confdoc import reference
    from birdbone.config import validate_recipe
    from birdbone.core.io import write_bytes_atomic

    conf = args.conf
    recipe = validate_recipe(_parameters(conf, "base"), Path.cwd(), [conf / "base"])
    write_bytes_atomic(args.out, reference(conf, recipe).encode())
    return 0


def bump(args: argparse.Namespace) -> int:
    from birdbone.core import diffs

    root = Path.cwd()
    path = diffs.write_bundle(root, args.rev, args.out)
    bundle = json.loads((path / "bundle.json").read_text())
    print(
        f"{path}: {len(bundle['params'])} settings changed, {bundle['masks']['changed_layers']} layers' masks, "
        f"{len(bundle['metrics'])} metrics"
    )
    if args.tag:  # one version per commit: a second bump of it keeps the tag it has
        already = diffs.version_tags(root, bundle["commit"])
        if already:
            print(f"{bundle['commit'][:12]} is already {already[0]}; no new tag")
        else:
            last = diffs.version_tags(root)[-1:]
            tag = f"model-v{int(last[0][7:]) + 1 if last else 1}"
            diffs.git(root, "tag", "-a", tag, bundle["commit"], "-m", f"bird-bone model {tag}: {bundle['message']}")
            print(f"tagged {bundle['commit'][:12]} as {tag}")
    if args.push:
        done = diffs.run_dvc(root, "push")
        if done.returncode:
            print(
                f"birdbone bump: dvc push failed: {done.stderr.strip() or done.stdout.strip()}\n"
                "Fix: set a default remote (dvc remote add -d local /path/to/dir), then birdbone bump again "
                "(the commit keeps its tag).",
                file=sys.stderr,
            )
            return 2
        print("pushed the DVC outputs to the default remote")
    return 0


def check_weights(args: argparse.Namespace) -> int:
    from birdbone.core.diffs import project_root, weight_problems

    problems = weight_problems(project_root())
    for problem in problems:
        print(f"birdbone check-weights: {problem}", file=sys.stderr)
    return 1 if problems else 0


def report(args: argparse.Namespace) -> int:
    from birdbone.core.report import write_report, write_views

    text, md, png = write_report(Path.cwd())
    views = write_views(Path.cwd())
    print(text)
    print(f"wrote {', '.join(str(p) for p in [md, png, *views])}")
    return 0


def pack(args: argparse.Namespace) -> int:
    """Packs ``args.source`` into ``args.target``; prints the statistics."""
    from birdbone.core.export.pack import compress_model

    stats = compress_model(args.source, args.target, args.strategy, args.overwrite)
    by: dict[str, dict[str, float]] = {}
    for t in stats["tensors"].values():
        row = by.setdefault(t["strategy"], {"tensors": 0, "bytes": 0, "packed": 0, "encode_ms": 0.0, "decode_ms": 0.0})
        row["tensors"] += 1
        row["bytes"] += t["bytes"]
        row["packed"] += t["packed_bytes"]
        row["encode_ms"] += t["encode_ms"]
        row["decode_ms"] += t["decode_ms"]
    print("| strategy | tensors | MB | packed MB | ratio | encode ms | decode ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, row in sorted(by.items()):
        print(
            f"| {name} | {row['tensors']} | {row['bytes'] / 1e6:.2f} | {row['packed'] / 1e6:.2f} | "
            f"{row['bytes'] / max(row['packed'], 1):.2f} | {row['encode_ms']:.0f} | {row['decode_ms']:.0f} |"
        )
    print(
        f"{stats['source']} -> {stats['target']}: {stats['bytes'] / 1e6:.2f} MB of tensors in "
        f"{stats['file_bytes'] / 1e6:.2f} MB (ratio {stats['ratio']:.2f}), lossless"
    )
    return 0


def unpack(args: argparse.Namespace) -> int:
    from birdbone.core.export.unpack import decompress_model

    print(decompress_model(args.pack, args.target, args.overwrite, args.max_bytes))
    return 0


class _Commands(click.Group):
    """The ``birdbone`` group: one handler for bird-bone's own errors (the message, which
    names the fix, and exit status 2), whichever command raised it."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BirdboneError as exc:
            click.echo(f"birdbone {ctx.invoked_subcommand}: {exc}", err=True)
            return 2


SETTINGS = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 100}
CONF = click.option("--conf", type=click.Path(path_type=Path), default=Path("conf"), help="The configuration folder.")
ENV = click.option("--env", default="local", help="The configuration environment, as kedro run --env.")
OVERWRITE = click.option("--overwrite", is_flag=True, help="Replace the target even if bird-bone did not write it.")


def _run(command: Any, **options: Any) -> int:
    return command(argparse.Namespace(**options))


@click.group(cls=_Commands, context_settings=SETTINGS)
@click.version_option(package_name="birdbone", prog_name="birdbone")
def cli() -> None:
    """bird-bone's commands beside kedro run: heal a model again, write the recipe for DVC,
    version a commit, report on the last run, pack and unpack models.

    Run them in the project root. Each bad input is named with its fix (exit status 2)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@cli.command("heal", short_help="Heal a model directory again, its masks kept.")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Where the healed model directory goes.")
@CONF
@ENV
@click.option(
    "--blocks",
    type=click.Path(path_type=Path),
    default=Path("data/03_primary/blocks.safetensors"),
    help="The baseline's token blocks (healing, validation, test).",
)
@click.option(
    "--teacher",
    type=click.Path(path_type=Path),
    default=Path("data/04_feature/heal_teacher_topk.safetensors"),
    help="The dense model's top-k logits (heal.distill_top_k set).",
)
@click.option(
    "--dense",
    type=click.Path(path_type=Path),
    default=Path("models/baseline"),
    help="The dense model run beside the student (heal.distill_top_k: null).",
)
@click.option("--steps", type=int, help="Optimizer steps.  [default: heal.final.steps]")
@click.option("--lr", type=float, help="Peak learning rate.  [default: heal.final.lr]")
@OVERWRITE
def heal_command(**options: Any) -> int:
    """Heal MODEL (a bird-bone model directory: models/decayed, a wave) into --out, its
    masks kept. Runs unchanged under accelerate launch (data parallel)."""
    return _run(heal, **options)


@cli.command("params", short_help="Write the env's validated recipe as params.yaml (for DVC).")
@CONF
@ENV
@click.option("--out", type=click.Path(path_type=Path), default=Path("params.yaml"), help="The YAML file to write.")
def params_command(**options: Any) -> int:
    """Write the env's recipe (conf/base with the env over it), validated and with every
    default filled in, as the one YAML file dvc.yaml's stages depend on."""
    return _run(params, **options)


@cli.command("bump", short_help="Write diffs/<sha>/, tag model-v<N>, push to the DVC remote.")
@click.option("--rev", default="HEAD", help="The commit.")
@click.option("--out", type=click.Path(path_type=Path), help="Where bundles go.  [default: diffs/]")
@click.option("--tag/--no-tag", default=True, help="Tag the commit model-v<N> (N: the last + 1).")
@click.option("--push/--no-push", default=True, help="dvc push the outputs to the default remote.")
def bump_command(**options: Any) -> int:
    """Write diffs/<sha>/ for a commit (settings, mask and metric deltas, weight hashes),
    tag it and push its DVC outputs."""
    return _run(bump, **options)


@cli.command("config-docs", short_help="Write docs/configuration.md from the config classes.")
@CONF
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("docs/configuration.md"), help="The page to write."
)
def config_docs_command(**options: Any) -> int:
    """Write the configuration reference (every key, its type, default and meaning) from
    the Pydantic classes and conf/base's comments."""
    return _run(config_docs, **options)


@cli.command("check-weights", short_help="Check weights against their recorded hashes.")
def check_weights_command() -> int:
    """Refuse weights that differ from their birdbone.json hashes or dvc.lock (the
    pre-commit hook)."""
    return _run(check_weights)


@cli.command("report", short_help="Tabulate and plot the last run, stage by stage.")
def report_command() -> int:
    """The last run, a row per stage (in-domain and general quality, size, speed by
    runtime), printed and written to data/08_reporting/report.md and report.png."""
    return _run(report)


@cli.command("pack", short_help="Store a model directory compactly, lossless.")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@click.option(
    "--strategy",
    type=click.Choice(["auto", "raw", "gzip", "rle", "sparse", "quantized"]),
    default="auto",
    help="The encoding; auto takes the smallest per tensor.",
)
@OVERWRITE
def pack_command(**options: Any) -> int:
    """Store SOURCE (a model directory or one .safetensors file) as the pack TARGET,
    lossless, each tensor in the encoding that takes the fewest bytes."""
    return _run(pack, **options)


@cli.command("unpack", short_help="Rebuild a pack's model directory, bit for bit.")
@click.argument("pack", type=click.Path(path_type=Path))
@click.argument("target", type=click.Path(path_type=Path))
@OVERWRITE
@click.option("--max-bytes", type=int, help="What the pack may inflate to.  [default: 64x its size, at least 256 MiB]")
def unpack_command(**options: Any) -> int:
    """Rebuild the model directory of PACK into TARGET, bit for bit."""
    return _run(unpack, **options)


def main(argv: list[str] | None = None) -> int:
    """``birdbone ARGS``; the exit status (2: a bad input or usage, with what to do)."""
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "true")
    try:
        code = cli.main(args=argv, prog_name="birdbone", standalone_mode=False)
    except click.ClickException as exc:  # usage: an unknown option, a missing argument
        exc.show()
        return exc.exit_code
    except click.Abort:
        click.echo("Aborted.", err=True)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
