"""GGUF export read back by llama.cpp: the same logits, text and perplexity as the torch
model it came from (or as our simulation of its quantization)."""

from __future__ import annotations

import copy
import errno

import gguf
import numpy as np
import pytest
import torch

from birdbone.core import evaluate, modeling, structure
from birdbone.core.export import gguf as export_gguf
from birdbone.core.export import llamacpp
from birdbone.core.masks import MaskSet
from birdbone.core.quantize import Grid, QuantTable, head_weights, quantize_model_
from birdbone.errors import ExportError, OutputError


@pytest.fixture()
def sharp(tiny_tokenizer) -> modeling.ModelBundle:
    """The tiny random model with weights scaled up: peaked logits, so that a wrong row
    order or a wrong scale shows."""
    model = modeling.tiny_model("llama", 3, 64, 4, 2, 128, len(tiny_tokenizer), seed=0)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4)
    return modeling.ModelBundle(model, tiny_tokenizer, modeling.adapter_for(model))


def _ids(vocab: int, n: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(0))


def _llama_logits(path, ids: torch.Tensor) -> np.ndarray:
    llm = llamacpp.load(path, n_ctx=ids.shape[0], logits_all=True)
    try:
        llm.eval(ids.tolist())
        return np.array(llm.scores[: ids.shape[0]])
    finally:
        llm.close()


@torch.no_grad()
def _torch_logits(bundle: modeling.ModelBundle, ids: torch.Tensor) -> np.ndarray:
    return bundle.model(ids[None]).logits[0].numpy()


def _close(path, bundle, ids) -> None:
    ours, theirs = _torch_logits(bundle, ids), _llama_logits(path, ids)
    assert np.abs(ours - theirs).max() < 0.01 * np.abs(ours).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.95


def test_float_export_gives_llama_cpp_the_torch_logits_text_and_perplexity(sharp, tmp_path) -> None:
    path = tmp_path / "model.gguf"
    report = export_gguf.write_gguf(sharp, path, float_type="F32", embedding="F32", progress=False)
    assert report["architecture"] == "llama" and report["types"] == {"F32": 3 * 9 + 3}  # untied: output.weight too
    ids = _ids(len(sharp.tokenizer))
    _close(path, sharp, ids[0])
    ppl_torch = evaluate.perplexity(sharp.model, ids)["ppl"]
    ppl_llama = llamacpp.perplexity(path, ids)["ppl"]
    assert abs(ppl_llama / ppl_torch - 1) < 0.01
    prompt = ids[0, :8].tolist()
    ours = sharp.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, 8:].tolist()
    assert llamacpp.generate(path, prompt, 12) == ours


def test_the_file_holds_the_tokenizer_and_the_hyperparameters(sharp, tmp_path) -> None:
    path = tmp_path / "model.gguf"
    export_gguf.write_gguf(sharp, path, tokenizer_pre="smollm", progress=False)
    fields = gguf.GGUFReader(path).fields
    assert fields["llama.block_count"].contents() == 3
    assert fields["llama.attention.head_count_kv"].contents() == 2
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == len(sharp.tokenizer)
    assert tokens[sharp.tokenizer.eos_token_id] == "<|endoftext|>"
    assert fields["tokenizer.ggml.eos_token_id"].contents() == sharp.tokenizer.eos_token_id


def test_uneven_shapes_go_out_as_deci_and_run(sharp, tmp_path) -> None:
    adapter, blocks = sharp.adapter, sharp.adapter.blocks(sharp.model)
    structure.keep_mlp_channels_(blocks[0].mlp, torch.arange(96), adapter)
    structure.keep_mlp_channels_(blocks[2].mlp, torch.arange(32), adapter)
    structure.keep_heads_(blocks[1].self_attn, torch.tensor([0, 1]), torch.tensor([0]), 16, adapter)
    structure.record_shapes(sharp.model, adapter)
    with pytest.raises(ExportError, match="llama architecture rejects"):
        export_gguf.write_gguf(sharp, tmp_path / "x.gguf", architecture="llama", progress=False)
    path = tmp_path / "deci.gguf"
    report = export_gguf.write_gguf(sharp, path, float_type="F32", embedding="F32", progress=False)
    assert report["architecture"] == "deci"
    assert gguf.GGUFReader(path).fields["deci.feed_forward_length"].contents() == [96, 128, 32]
    _close(path, sharp, _ids(len(sharp.tokenizer))[0])


def test_deci_and_llama_files_of_one_model_generate_the_same_text(sharp, tmp_path) -> None:
    for arch in ("llama", "deci"):
        export_gguf.write_gguf(sharp, tmp_path / f"{arch}.gguf", architecture=arch, progress=False)
    prompt = _ids(len(sharp.tokenizer))[0, :8].tolist()
    llama = llamacpp.generate(tmp_path / "llama.gguf", prompt, 16)
    assert llamacpp.generate(tmp_path / "deci.gguf", prompt, 16) == llama


def _quantized(bundle: modeling.ModelBundle, grids_for, head: tuple[Grid, str] | None = None) -> modeling.ModelBundle:
    linears = bundle.adapter.linears(bundle.model)
    masks = MaskSet(
        {
            f"{n}.weight": torch.rand(lin.weight.shape, generator=torch.Generator().manual_seed(1)) > 0.4
            for n, lin in linears.items()
        }
    )
    masks.apply_(bundle.model)
    bundle.masks = masks
    grids = {f"{n}.weight": grids_for(n) for n in linears}
    scales = quantize_model_(bundle, grids, "rtn", _ids(len(bundle.tokenizer)), 2, head=head)
    heads = {name: head[0] for name in head_weights(bundle)} if head else {}
    bundle.quant = QuantTable({**grids, **heads}, scales)
    return bundle


def test_quantized_weights_are_packed_not_rounded_again(sharp, tmp_path) -> None:
    bundle = _quantized(sharp, lambda n: Grid(8, 32, True) if "down_proj" in n else Grid(3, 32, True))
    path = tmp_path / "q.gguf"
    report = export_gguf.write_gguf(bundle, path, progress=False)
    assert report["types"] == {"Q4_0": 18, "Q8_0": 5, "F32": 7}  # 3-bit in Q4_0; 8-bit, embedding, head in Q8_0
    assert all("3-bit sym g32 held exactly in Q4_0" in report["fallbacks"][f"blk.{i}.attn_q.weight"] for i in range(3))
    assert report["embedding"] == "Q8_0"
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    up = tensors["blk.1.ffn_up.weight"]
    back = gguf.quants.dequantize(np.array(up.data), up.tensor_type)
    assert np.array_equal(back, bundle.model.model.layers[1].mlp.up_proj.weight.detach().numpy())
    # llama.cpp computes what our simulation does: block Linears as quantized, embedding rounded as stored
    plan = export_gguf.plan_gguf(bundle)
    export_gguf.simulate_(bundle, plan)
    ids = _ids(len(bundle.tokenizer), 4)
    assert abs(llamacpp.perplexity(path, ids)["ppl"] / evaluate.perplexity(bundle.model, ids)["ppl"] - 1) < 0.01


def test_asymmetric_blocks_are_noted_only_where_weights_were_pruned(sharp, tmp_path) -> None:
    dense = copy.deepcopy(sharp)
    pruned = _quantized(sharp, lambda n: Grid(4, 32, False))
    report = export_gguf.write_gguf(pruned, tmp_path / "pruned.gguf", progress=False)
    assert "pruned weights hold the code nearest 0" in report["fallbacks"]["blk.0.attn_q.weight"]
    linears = dense.adapter.linears(dense.model)
    dense.masks = MaskSet({f"{n}.weight": torch.ones_like(lin.weight, dtype=torch.bool) for n, lin in linears.items()})
    grids = {f"{n}.weight": Grid(4, 32, False) for n in linears}  # a Q4_1 model with masks, none pruned
    dense.quant = QuantTable(grids, quantize_model_(dense, grids, "rtn", _ids(len(dense.tokenizer)), 2))
    report = export_gguf.write_gguf(dense, tmp_path / "dense.gguf", progress=False)
    assert report["types"]["Q4_1"] == 3 * 7 and not any(n.startswith("blk.") for n in report["fallbacks"])


def test_a_head_the_quantize_stage_quantized_is_packed_as_it_left_it(sharp, tmp_path) -> None:
    bundle = _quantized(sharp, lambda n: Grid(4, 32, True), head=(Grid(4, 32, True), "gptq"))
    path = tmp_path / "q.gguf"
    report = export_gguf.write_gguf(bundle, path, progress=False)
    assert report["embedding"] == "Q4_0" and report["types"] == {"Q4_0": 3 * 7 + 2, "F32": 7}
    assert not any(not name.startswith("blk.") for name in report["fallbacks"])
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for gname, weight in (
        ("output.weight", bundle.model.lm_head.weight),
        ("token_embd.weight", bundle.model.model.embed_tokens.weight),
    ):
        back = gguf.quants.dequantize(np.array(tensors[gname].data), tensors[gname].tensor_type)
        assert np.array_equal(back.reshape(weight.shape), weight.detach().numpy())
    plan = export_gguf.plan_gguf(bundle)
    before = bundle.model.lm_head.weight.detach().clone()
    export_gguf.simulate_(bundle, plan)  # nothing left to round: the file holds the torch weights
    assert torch.equal(bundle.model.lm_head.weight, before)
    ids = _ids(len(bundle.tokenizer), 4)
    assert abs(llamacpp.perplexity(path, ids)["ppl"] / evaluate.perplexity(bundle.model, ids)["ppl"] - 1) < 0.01
    # another type asked for: the export rounds the quantized head again, and says so
    again = export_gguf.write_gguf(bundle, tmp_path / "q8.gguf", embedding="Q8_0", progress=False)
    assert again["embedding"] == "Q8_0"
    assert "quantized head (4-bit sym g32) rounded again to Q8_0" in again["fallbacks"]["token_embd.weight"]


def test_groups_no_block_format_holds_fall_back_to_f16_and_are_listed(sharp, tmp_path) -> None:
    bundle = _quantized(sharp, lambda n: Grid(4, 16, True))
    report = export_gguf.write_gguf(bundle, tmp_path / "q.gguf", progress=False)
    assert report["types"]["F16"] == 3 * 7
    assert sum(name.startswith("blk.") for name in report["fallbacks"]) == 3 * 7
    assert "do not fill" in report["fallbacks"]["blk.0.ffn_down.weight"]


def test_refusals_name_the_problem_and_leave_nothing(sharp, tiny_tokenizer, tmp_path, monkeypatch) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"keep me")
    with pytest.raises(ExportError, match="exists. Fix: choose another path, or pass overwrite=True"):
        export_gguf.write_gguf(sharp, path, progress=False)
    assert path.read_bytes() == b"keep me"
    qwen = modeling.tiny_model("qwen2", vocab=len(tiny_tokenizer))
    with pytest.raises(ExportError, match="Llama family.*'qwen2'"):
        export_gguf.write_gguf(
            modeling.ModelBundle(qwen, tiny_tokenizer, modeling.adapter_for(qwen)), tmp_path / "q.gguf"
        )

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full)
    with pytest.raises(OutputError, match="could not write .*model.gguf: no space left"):
        export_gguf.write_gguf(sharp, path, overwrite=True, progress=False)
    assert path.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_gptq_on_a_k_quant_grid_goes_out_as_q4_k_and_runs(tiny_tokenizer, tmp_path) -> None:
    model = modeling.tiny_model("llama", 2, 256, 4, 2, 512, len(tiny_tokenizer), seed=0)
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4)
    bundle = modeling.ModelBundle(model, tiny_tokenizer, modeling.adapter_for(model))
    grid = Grid(4, 32, False, 256)
    grids = {f"{n}.weight": grid for n in bundle.adapter.linears(model)}

    class Options:
        block_size, damp, act_order = 128, 0.01, False

    scales = quantize_model_(bundle, grids, "gptq", _ids(len(tiny_tokenizer), 8), 4, options=Options())
    bundle.quant = QuantTable(grids, scales)
    path = tmp_path / "k.gguf"
    report = export_gguf.write_gguf(bundle, path, progress=False)
    assert report["types"]["Q4_K"] == 2 * 7 and report["block_linear_bits_per_weight"] == 4.5
    export_gguf.simulate_(bundle, export_gguf.plan_gguf(bundle))
    ids = _ids(len(tiny_tokenizer), 4)
    assert abs(llamacpp.perplexity(path, ids)["ppl"] / evaluate.perplexity(bundle.model, ids)["ppl"] - 1) < 0.01


@pytest.mark.slow
def test_smollm2_as_deci_says_what_the_llama_file_says_and_runs_with_uneven_widths(tmp_path) -> None:
    from birdbone.config import DefaultModel

    bundle = modeling.load_model(DefaultModel(kind="default"))
    pre = export_gguf.source_tokenizer_pre(modeling.default_gguf_path())
    assert pre == "smollm"
    prompt = bundle.tokenizer("The capital of France is")["input_ids"]
    for arch in ("llama", "deci"):
        export_gguf.write_gguf(bundle, tmp_path / f"{arch}.gguf", architecture=arch, tokenizer_pre=pre, progress=False)
    llama = llamacpp.generate(tmp_path / "llama.gguf", prompt, 16)
    assert llamacpp.generate(tmp_path / "deci.gguf", prompt, 16) == llama
    assert "Paris" in bundle.tokenizer.decode(llama)
    # per-layer FFN widths (every block a different multiple of 32): the deci file loads and runs
    adapter = bundle.adapter
    for i, block in enumerate(adapter.blocks(bundle.model)):
        structure.keep_mlp_channels_(block.mlp, torch.arange(1536 - 32 * (i % 8)), adapter)
    structure.record_shapes(bundle.model, adapter)
    report = export_gguf.write_gguf(bundle, tmp_path / "uneven.gguf", tokenizer_pre=pre, progress=False)
    assert report["architecture"] == "deci"
    from pydoc_data.topics import topics

    ids = torch.tensor([bundle.tokenizer(topics["assignment"])["input_ids"][:512]])
    ppl_llama = llamacpp.perplexity(tmp_path / "uneven.gguf", ids)["ppl"]
    assert abs(ppl_llama / evaluate.perplexity(bundle.model, ids)["ppl"] - 1) < 0.01
    assert len(llamacpp.generate(tmp_path / "uneven.gguf", prompt, 8)) == 8
