"""GGUF files for llama.cpp, written with the ``gguf`` package, for the Llama family.

Uniform shapes go out as llama.cpp's ``llama`` architecture. Uneven shapes (per-layer
FFN widths and head counts after structured pruning) go out as its ``deci`` architecture,
which takes ``feed_forward_length``, ``attention.head_count`` and
``attention.head_count_kv`` as per-layer arrays (``llama`` rejects them); fewer blocks are
just a smaller block count.

Quantized weights go into GGUF block formats as the quantize stage made them: its codes
and float16 scales are packed, not rounded again, so GPTQ's error feedback and per-tensor
bit choices survive. A grid with no block format of its own is held exactly by a wider one
(3-bit symmetric groups of 32 in Q4_0: the same scale, codes in a sub-range); a grid no
format can hold goes out as float16 and the report lists it. Every tensor's choice is in
the report, with the reason where it is not the grid's own format.

Block layouts (llama.cpp's ``ggml-common.h``), 32 weights per block, little-endian:

- Q8_0: d (f16), 32 x int8 q; x = d q
- Q4_0: d (f16), 16 bytes: low nibbles weights 0-15, high nibbles 16-31, q + 8; x = d q
- Q4_1: d, m (f16), nibbles as Q4_0 holding q; x = d q + m
- Q5_0: d (f16), qh (u32: bit i the fifth bit of weight i), nibbles; q + 16; x = d q
- Q5_1: d, m (f16), qh, nibbles holding q; x = d q + m
- Q4_K, 256 weights: D, M (f16), 12 bytes of eight 6-bit (sc, mn) pairs, 128 bytes of
  nibbles (per 64 weights: the first 32 low, the next 32 high); x = D sc q - M mn

llama.cpp's converter reorders the rows of the Q and K projections for its RoPE layout
(each head's two rotary halves interleaved); so does this writer. Groups run along input
columns, so reordering rows moves codes and scales together and changes no value.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from birdbone.core import structure
from birdbone.core.io import atomic_path, sha256_file
from birdbone.core.quantize import Grid, codes, detect_grid, rtn
from birdbone.errors import ExportError

log = logging.getLogger(__name__)

QK = 32  # weights per block of every format here
BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q4_K": 144}
BLOCK_WEIGHTS = {"Q4_K": 256}  # the others: QK
FLOAT_TYPES = ("F32", "F16")
TYPES = (*FLOAT_TYPES, *BLOCK_BYTES)
# the grid each block type stores natively
NATIVE = {
    "Q8_0": Grid(8, QK, True),
    "Q4_0": Grid(4, QK, True),
    "Q4_1": Grid(4, QK, False),
    "Q5_0": Grid(5, QK, True),
    "Q5_1": Grid(5, QK, False),
    "Q4_K": Grid(4, QK, False, 256),
}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 15}
ARCHITECTURES = ("llama",)  # HF model types this writer knows the tensor names of

# HF Llama module names -> GGUF tensor names (block-level ones with the block index)
BLOCK_TENSORS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


@dataclass(frozen=True)
class Storage:
    """How one tensor is stored: its GGUF type, the grid its values lie on (None: float),
    and why, where that is not the grid's own format."""

    type: str
    grid: Grid | None = None
    note: str | None = None


def container(grid: Grid, columns: int) -> Storage:
    """The GGUF type that holds ``grid``'s values exactly, or float16 with the reason.

    A grid with groups of a multiple of 32 (or whole rows of a multiple of 32) fits a block
    format whose blocks repeat the group's scale; codes of fewer bits fit a wider format.
    """
    group = grid.group or columns
    if grid.superblock:
        if grid.gguf_type() != "Q4_K" and not (grid.bits < 4 and not grid.sym and grid.superblock == 256):
            return Storage("F16", None, f"{grid.describe()}: no GGUF K-quant block holds it; stored as float16")
        if columns % grid.superblock:
            return Storage("F16", None, f"{grid.describe()} on rows of {columns}: not whole superblocks")
        note = None if grid.bits == 4 else f"{grid.describe()} held exactly in Q4_K (4-bit codes)"
        return Storage("Q4_K", grid, note)
    if columns % QK or group % QK:
        return Storage(
            "F16",
            None,
            f"{grid.describe()} on rows of {columns}: GGUF blocks hold 32 weights with one scale, "
            "which groups of this size do not fill; stored as float16",
        )
    if grid.sym:
        kind = "Q4_0" if grid.bits <= 4 else "Q5_0" if grid.bits == 5 else "Q8_0"
    elif grid.bits <= 5:
        kind = "Q4_1" if grid.bits <= 4 else "Q5_1"
    else:
        return Storage("F16", None, f"{grid.describe()}: no GGUF block format holds asymmetric codes over 5 bits")
    native = NATIVE[kind]
    note = None
    if grid.bits != native.bits:
        note = f"{grid.describe()} held exactly in {kind} ({native.bits}-bit codes: the file spends more bits)"
    elif group != QK:
        note = f"{grid.describe()} held exactly in {kind} (each group's scale repeated per block of {QK})"
    return Storage(kind, grid, note)


# --------------------------------------------------------------------------- packing


def _per_block(scale: torch.Tensor, columns: int) -> np.ndarray:
    """A group scale ``[rows, groups]`` repeated to one per block of 32, as float16 bytes."""
    repeat = columns // QK // scale.shape[1]
    d = scale.float().repeat_interleave(repeat, 1).numpy().astype(np.float16)
    return d.view(np.uint8).reshape(d.shape[0], d.shape[1], 2)


def _nibbles(values: np.ndarray) -> np.ndarray:
    """``[rows, blocks, 32]`` values 0-15 -> ``[rows, blocks, 16]`` bytes (weights 0-15 in
    the low nibbles, 16-31 in the high ones)."""
    return (values[..., :16] | (values[..., 16:] << 4)).astype(np.uint8)


def _high_bits(values: np.ndarray) -> np.ndarray:
    """``[rows, blocks, 32]`` values 0-31 -> their fifth bits as a little-endian u32 per block."""
    bits = ((values >> 4) & 1).astype(np.uint32)
    qh = (bits << np.arange(QK, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(values.shape[0], values.shape[1], 4)


def pack(kind: str, q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Codes ``q`` ``[rows, columns]`` (as ``quantize.codes`` gives them) with their group
    scales ``d`` and offsets ``m`` ``[rows, groups]`` -> ``[rows, bytes]`` of block type ``kind``."""
    if kind == "Q4_K":
        return _pack_q4_k(q, d, m)
    rows, columns = q.shape
    blocks = columns // QK
    codes_ = q.to(torch.int16).numpy().reshape(rows, blocks, QK)
    parts = [_per_block(d, columns)]
    if kind in ("Q4_1", "Q5_1"):
        parts.append(_per_block(m, columns))
    if kind == "Q8_0":
        parts.append(codes_.astype(np.int8).view(np.uint8))
    elif kind in ("Q4_0", "Q4_1"):
        parts.append(_nibbles((codes_ + (8 if kind == "Q4_0" else 0)).astype(np.uint8)))
    elif kind in ("Q5_0", "Q5_1"):
        values = (codes_ + (16 if kind == "Q5_0" else 0)).astype(np.uint8)
        parts += [_high_bits(values), _nibbles(values & 15)]
    else:
        raise ExportError(f"no packer for GGUF type {kind}")
    out = np.concatenate(parts, axis=2).reshape(rows, blocks * BLOCK_BYTES[kind])
    return np.ascontiguousarray(out)


def _pack_q4_k(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> np.ndarray:
    """Q4_K blocks from codes and the K-quant group scales ``quantize.k_scales`` made (each
    superblock's largest group scale is 63 D exactly, so D, M and the levels come back)."""
    rows, columns = q.shape
    supers = columns // 256
    d = d.float().reshape(rows, supers, 8)
    neg = (-m.float()).reshape(rows, supers, 8)
    parts = []
    levels = []
    for v in (d, neg):
        big = v.amax(-1, keepdim=True) / 63
        level = torch.where(big == 0, torch.zeros_like(v), torch.round(v / torch.where(big == 0, 1.0, big)))
        if not torch.equal(big * level, v) or bool((level > 63).any()):
            raise ExportError("scales that are not K-quant scales (quantize.k_scales) cannot be packed as Q4_K")
        parts.append(big.half().numpy().view(np.uint8).reshape(rows, supers, 2))
        levels.append(level.to(torch.uint8).numpy())
    sc, mn = levels
    scales = np.zeros((rows, supers, 12), dtype=np.uint8)
    scales[..., 0:4] = (sc[..., 0:4] & 63) | ((sc[..., 4:8] >> 4) << 6)
    scales[..., 4:8] = (mn[..., 0:4] & 63) | ((mn[..., 4:8] >> 4) << 6)
    scales[..., 8:12] = (sc[..., 4:8] & 15) | ((mn[..., 4:8] & 15) << 4)
    codes_ = q.to(torch.uint8).numpy().reshape(rows, supers, 4, 2, 32)
    qs = (codes_[:, :, :, 0, :] | (codes_[:, :, :, 1, :] << 4)).reshape(rows, supers, 128)
    out = np.concatenate([parts[0], parts[1], scales, qs], axis=2).reshape(rows, supers * 144)
    return np.ascontiguousarray(out)


def quantized_bytes(
    name: str,
    weight: torch.Tensor,
    storage: Storage,
    scales: tuple[torch.Tensor, torch.Tensor] | None,
    keep: Any,
    rounding: bool = False,
) -> np.ndarray:
    """The block bytes of a weight whose values lie on ``storage.grid`` under ``scales``.

    ``scales`` None: the grid's round-to-nearest scales, for weights kept on the grid they
    came on (an error if they are not on it), or, with ``rounding``, for a tensor the
    export itself rounds (the embedding)."""
    grid = storage.grid
    assert grid is not None
    w = weight.detach().float()
    if scales is None:
        values, scales = rtn(w, grid, keep)
        drift = float((values - w).abs().max())
        if not rounding and drift > 1e-6 * max(float(w.abs().max()), 1e-30):
            raise ExportError(
                f"{name} is marked as lying on {grid.describe()} but rounding it moves it by {drift:.3g}. "
                "Fix: export the model as the quantize stage wrote it."
            )
        w = values
    q = codes(w, scales, grid, keep)
    return pack(storage.type, q, scales[0], scales[1])


def _rope_rows(rows: int, heads: int) -> torch.Tensor:
    """llama.cpp's row order of a Q or K projection with ``heads`` heads: within each head,
    the two rotary halves interleaved (row h, j, t takes old row h, t, j)."""
    if heads == 0:
        return torch.arange(rows)
    return torch.arange(rows).reshape(heads, 2, rows // heads // 2).transpose(1, 2).reshape(-1)


# --------------------------------------------------------------------------- tokenizer


def tokenizer_metadata(tokenizer: Any, vocab_rows: int) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` fields of a byte-level BPE tokenizer (GPT-2 style, as
    SmolLM, Llama 3 and Qwen use): tokens in id order, their types, merges, special ids.

    Raises:
        ExportError: the tokenizer is not a byte-level BPE (SentencePiece models need
            scores this writer does not derive).
    """
    import json

    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ExportError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 style); this one is "
            f"{model.get('type', type(tokenizer).__name__)}. Fix: export safetensors (export.formats: [safetensors]) "
            "and convert with llama.cpp's convert_hf_to_gguf.py."
        )
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in spec.get("added_tokens", [])}
    for content, token in added.items():
        vocab[content] = token["id"]
    if max(vocab.values()) >= vocab_rows:
        raise ExportError(
            f"the tokenizer has ids up to {max(vocab.values())} but the embedding only {vocab_rows} rows. "
            "Fix: export with the tokenizer the model was trained with."
        )
    tokens = [f"[PAD{i}]" for i in range(vocab_rows)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_rows
    for content, index in vocab.items():
        tokens[index] = content
        token = added.get(content)
        if token is None:
            types[index] = int(gguf.TokenType.NORMAL)
        else:
            types[index] = int(gguf.TokenType.CONTROL if token.get("special") else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {"tokens": tokens, "types": types, "merges": merges}
    for key in ("bos", "eos", "unk", "pad"):
        index = getattr(tokenizer, f"{key}_token_id", None)
        if index is not None:
            meta[key] = int(index)
    meta["add_bos"] = bool(getattr(tokenizer, "add_bos_token", False))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        meta["chat_template"] = template
    return meta


def source_tokenizer_pre(path: str | os.PathLike[str]) -> str | None:
    """``tokenizer.ggml.pre`` of an existing GGUF file (the model's source), if it has one."""
    import gguf

    field_ = gguf.GGUFReader(path).fields.get("tokenizer.ggml.pre")
    return None if field_ is None else str(field_.contents())


# --------------------------------------------------------------------------- plan


@dataclass
class GGUFPlan:
    """What a GGUF of a model holds: architecture, per-layer shapes, each tensor's storage."""

    architecture: str
    shapes: list[dict[str, int]]
    storage: dict[str, Storage]  # GGUF tensor name -> storage
    source: dict[str, str]  # GGUF tensor name -> HF parameter name
    embedding_grid: Grid | None = None
    notes: list[str] = field(default_factory=list)

    def fallbacks(self) -> dict[str, str]:
        return {name: s.note for name, s in self.storage.items() if s.note}


def check_exportable(bundle: Any) -> None:
    """Raises ``ExportError`` before any work when the model cannot go into a GGUF."""
    config = bundle.model.config
    if config.model_type not in ARCHITECTURES:
        raise ExportError(
            f"GGUF export writes the Llama family ({', '.join(ARCHITECTURES)}); this model is "
            f"'{config.model_type}'. Fix: export.formats: [safetensors] for it."
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError(
            "the model's attention or MLP Linears have biases, which this GGUF writer does not map. "
            "Fix: export.formats: [safetensors]."
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(
            f"the model uses RoPE scaling '{rope.get('rope_type')}', which this GGUF writer does not write. "
            "Fix: export.formats: [safetensors]."
        )


def plan_gguf(bundle: Any, float_type: str = "F16", embedding: str = "auto", architecture: str = "auto") -> GGUFPlan:
    """Each tensor's GGUF storage, and the architecture.

    Block Linears: their quantize grid's block format (``bundle.quant``), else
    ``float_type``. Embedding (and an untied output head): ``auto`` keeps a GGUF grid its
    weights already lie on (a Q8_0 source file's), else Q8_0; or the type named. Norms: F32.
    ``architecture`` ``auto``: ``llama`` when every layer has the same shapes, else
    ``deci``; ``deci`` may be asked for uniform shapes too."""
    check_exportable(bundle)
    if float_type not in FLOAT_TYPES:
        raise ExportError(f"float type {float_type} is not one of {', '.join(FLOAT_TYPES)}. Fix: F16 or F32.")
    if embedding != "auto" and embedding not in TYPES:
        raise ExportError(f"embedding type {embedding} is not auto or one of {', '.join(TYPES)}.")
    model, adapter = bundle.model, bundle.adapter
    shapes = structure.layer_shapes(model, adapter)
    uniform = all(s == shapes[0] for s in shapes)
    storage: dict[str, Storage] = {}
    source: dict[str, str] = {}
    notes: list[str] = []

    embed = adapter.embeddings(model).weight
    quantized = bundle.quant.grids.get(f"{adapter.embed_path}.weight") if bundle.quant is not None else None
    round_grid: Grid | None = None
    if embedding == "auto" and quantized is not None:  # the quantize stage's head codes, packed as they are
        emb = container(quantized, embed.shape[1])
    elif embedding == "auto":
        found = detect_grid({"embed": embed})
        kind = next((k for k, g in NATIVE.items() if g == found), None)
        emb = Storage(kind, found) if kind else Storage("Q8_0", NATIVE["Q8_0"], "embedding rounded to Q8_0 (RTN)")
        round_grid = emb.grid
    elif embedding in NATIVE:
        emb = Storage(embedding, NATIVE[embedding])
    else:
        emb = Storage(embedding)
    if embedding != "auto":
        round_grid = emb.grid
        if quantized is not None:
            emb = Storage(
                emb.type, emb.grid, f"the quantized head ({quantized.describe()}) rounded again to {emb.type}"
            )
    storage["token_embd.weight"], source["token_embd.weight"] = emb, f"{adapter.embed_path}.weight"
    if not model.config.tie_word_embeddings:
        storage["output.weight"], source["output.weight"] = emb, f"{adapter.head_path}.weight"
    storage["output_norm.weight"], source["output_norm.weight"] = Storage("F32"), f"{adapter.norm_path}.weight"

    quant = bundle.quant
    for i, _ in enumerate(adapter.blocks(model)):
        for hf, gg in BLOCK_TENSORS.items():
            hf_name, name = f"{adapter.blocks_path}.{i}.{hf}.weight", f"blk.{i}.{gg}.weight"
            source[name] = hf_name
            if "norm" in hf:
                storage[name] = Storage("F32")
                continue
            grid = quant.grid_of(hf_name) if quant is not None else None
            columns = model.get_parameter(hf_name).shape[1]
            storage[name] = container(grid, columns) if grid is not None else Storage(float_type)
            masks = bundle.masks
            pruned = masks is not None and hf_name in masks and masks.kept(hf_name) < masks.numel(hf_name)
            if grid is not None and not grid.sym and pruned:
                storage[name] = Storage(
                    storage[name].type,
                    storage[name].grid,
                    "asymmetric blocks: pruned weights hold the code nearest 0, not exactly 0",
                )
    if quant is not None and quant.corrections:
        notes.append(
            f"the low-rank corrections of {len(quant.corrections)} weights are not in the GGUF "
            "(they are a LoRA adapter beside the quantized model); llama.cpp runs the quantized weights alone"
        )
    if architecture not in ("auto", "llama", "deci"):
        raise ExportError(f"GGUF architecture {architecture} is not auto, llama or deci.")
    if architecture == "llama" and not uniform:
        raise ExportError(
            "the layers have different shapes (per-layer FFN widths or head counts), which llama.cpp's llama "
            "architecture rejects. Fix: architecture auto or deci (per-layer arrays)."
        )
    arch = architecture if architecture != "auto" else "llama" if uniform else "deci"
    if not uniform:
        notes.append("uneven layer shapes: written as llama.cpp's deci architecture (per-layer arrays)")
    return GGUFPlan(arch, shapes, storage, source, round_grid, notes)


@torch.no_grad()
def simulate_(bundle: Any, plan: GGUFPlan) -> None:
    """Rounds ``bundle``'s embedding (and untied head) as the GGUF stores them, so that the
    torch model computes what the file holds (the block Linears already do)."""
    model, adapter = bundle.model, bundle.adapter
    heads = [adapter.embeddings(model).weight]
    if not model.config.tie_word_embeddings:
        heads.append(adapter.head(model).weight)
    kind = plan.storage["token_embd.weight"].type
    for weight in heads:
        if plan.embedding_grid is not None:
            weight.copy_(rtn(weight, plan.embedding_grid)[0].to(weight.dtype))
        elif kind == "F16":
            weight.copy_(weight.half().to(weight.dtype))


# --------------------------------------------------------------------------- write


def _array(name: str, tensor: torch.Tensor, storage: Storage, scales: Any, keep: Any) -> tuple[np.ndarray, Any]:
    import gguf

    t = tensor.detach().float().cpu()
    if storage.grid is not None:
        rounding = not name.startswith("blk.")  # the embedding / head: rounded by the export
        return quantized_bytes(name, t, storage, scales, keep, rounding), gguf.GGMLQuantizationType[storage.type]
    dtype = np.float16 if storage.type == "F16" else np.float32
    return np.ascontiguousarray(t.numpy().astype(dtype)), None


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def write_gguf(
    bundle: Any,
    path: str | os.PathLike[str],
    *,
    float_type: str = "F16",
    embedding: str = "auto",
    architecture: str = "auto",
    tokenizer_pre: str | None = None,
    name: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    plan: GGUFPlan | None = None,
) -> dict[str, Any]:
    """Writes ``bundle`` as a GGUF file at ``path`` (atomically) and returns the report:
    path, bytes, architecture, each tensor's type, the fallbacks and why, bits per weight.
    ``plan``: ``plan_gguf``'s result for these settings, when the caller has it already.

    Raises:
        ExportError: the model or the settings cannot be exported, ``path`` exists and
            ``overwrite`` is false.
        OutputError: the disk filled or is read-only (nothing is left at ``path``).
    """
    import gguf

    path = Path(path)
    if path.exists() and not overwrite:
        raise ExportError(f"{path} exists. Fix: choose another path, or pass overwrite=True.")
    plan = plan or plan_gguf(bundle, float_type, embedding, architecture)
    model, config = bundle.model, bundle.model.config
    _, _, head_dim = bundle.adapter.attention_shape(config)
    arch = plan.architecture
    shapes = plan.shapes
    if tokenizer_pre is None:
        plan.notes.append("tokenizer.ggml.pre 'default': the source's pre-tokenizer is unknown")
    vocab_rows = bundle.adapter.embeddings(model).num_embeddings
    tok = tokenizer_metadata(bundle.tokenizer, vocab_rows)

    params = dict(model.named_parameters(remove_duplicate=False))
    quant = bundle.quant
    masks = bundle.masks
    tensors: list[tuple[str, np.ndarray, Any]] = []
    linear_bits = linear_weights = 0
    types: dict[str, str] = {}
    for gname, storage in plan.storage.items():
        hf_name = plan.source[gname]
        weight = params[hf_name]
        scales = quant.scales.get(hf_name) if quant is not None else None
        if scales is not None and not gname.startswith("blk.") and plan.embedding_grid is not None:
            scales = None  # the export rounds the head to another type itself
        keep = masks[hf_name] if masks is not None and hf_name in masks else None
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            layer = int(gname.split(".")[1])
            key = "num_attention_heads" if gname.endswith("attn_q.weight") else "num_key_value_heads"
            order = _rope_rows(weight.shape[0], shapes[layer][key])
            weight = weight[order]
            scales = None if scales is None else (scales[0][order], scales[1][order])
            keep = None if keep is None else keep[order]
        array, raw = _array(gname, weight, storage, scales, keep)
        tensors.append((gname, array, raw))
        types[gname] = storage.type
        if gname.startswith("blk.") and weight.ndim == 2:
            linear_weights += weight.numel()
            linear_bits += array.nbytes * 8

    dominant = Counter(t for n, t in types.items() if n.startswith("blk.") and "norm" not in n).most_common(1)[0][0]
    # a full or read-only disk is an OutputError from atomic_path, with nothing left at path
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        # never the directory it was loaded from: the file must not depend on where the project is
        writer.add_name(name or Path(str(getattr(config, "_name_or_path", "") or "")).name or "bird-bone model")
        writer.add_block_count(len(shapes))
        writer.add_context_length(int(config.max_position_embeddings))
        writer.add_embedding_length(int(config.hidden_size))
        per_layer = arch == "deci"
        writer.add_feed_forward_length(
            [s["intermediate_size"] for s in shapes] if per_layer else shapes[0]["intermediate_size"]
        )
        writer.add_head_count(
            [s["num_attention_heads"] for s in shapes] if per_layer else shapes[0]["num_attention_heads"]
        )
        writer.add_head_count_kv(
            [s["num_key_value_heads"] for s in shapes] if per_layer else shapes[0]["num_key_value_heads"]
        )
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(vocab_rows)
        writer.add_file_type(FILE_TYPES[dominant])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(tokenizer_pre or "default")
        writer.add_token_list(tok["tokens"])
        writer.add_token_types(tok["types"])
        writer.add_token_merges(tok["merges"])
        for key, add in (
            ("bos", writer.add_bos_token_id),
            ("eos", writer.add_eos_token_id),
            ("unk", writer.add_unk_token_id),
            ("pad", writer.add_pad_token_id),
        ):
            if key in tok:
                add(tok[key])
        writer.add_add_bos_token(tok["add_bos"])
        if "chat_template" in tok:
            writer.add_chat_template(tok["chat_template"])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for gname, array, raw in tensors:
            writer.add_tensor(gname, array, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
    report = {
        "path": str(path),
        "format": "gguf",
        "architecture": arch,
        "bytes": path.stat().st_size,
        "sha256": sha256_file(path),
        "block_linear_bits_per_weight": linear_bits / max(linear_weights, 1),
        "bits_per_weight": path.stat().st_size * 8 / sum(p.numel() for p in model.parameters()),
        "file_type": dominant,
        "types": dict(sorted(Counter(types.values()).items())),
        "embedding": plan.storage["token_embd.weight"].type,
        "fallbacks": plan.fallbacks(),
        "notes": plan.notes,
        "tokenizer_pre": tokenizer_pre or "default",
    }
    log.info(
        "GGUF %s: %s, %.1f MB, block Linears at %.3f bits/weight%s",
        path,
        arch,
        report["bytes"] / 1e6,
        report["block_linear_bits_per_weight"],
        f", {len(report['fallbacks'])} tensors not in their grid's own format" if report["fallbacks"] else "",
    )
    return report
