"""The general split: text the dense model writes itself, seeded, and the measures on it."""

import copy
from pathlib import Path

import pytest
import torch

from birdbone.core import evaluate
from birdbone.core.generate import sample_blocks


def test_the_same_seed_writes_the_same_blocks_and_another_seed_others(tiny_bundle):
    model, tokenizer = tiny_bundle.model, tiny_bundle.tokenizer
    first = sample_blocks(model, tokenizer, count=5, length=12, seed=3, batch_size=2)
    assert first.shape == (5, 12) and first.dtype == torch.long
    assert torch.equal(first, sample_blocks(model, tokenizer, count=5, length=12, seed=3, batch_size=5))
    assert not torch.equal(first, sample_blocks(model, tokenizer, count=5, length=12, seed=4, batch_size=2))
    assert int(first.min()) >= 0 and int(first.max()) < len(tokenizer)
    special = set(tokenizer.all_special_ids)
    assert not special & set(first[:, 0].tolist())  # random first tokens, never a special one


def test_a_cold_temperature_writes_the_models_own_greedy_continuation(tiny_bundle):
    model, tokenizer = tiny_bundle.model, tiny_bundle.tokenizer
    blocks = sample_blocks(model, tokenizer, count=3, length=10, seed=0, temperature=1e-4)
    with torch.no_grad():
        logits = model(blocks, use_cache=False).logits
    # the cached decoding's logits differ from a full pass in the last bits: near-ties may flip
    assert float((logits[:, :-1].argmax(-1) == blocks[:, 1:]).float().mean()) > 0.9


def test_dense_agrees_with_itself_and_a_damaged_copy_does_not(tiny_bundle):
    model, tokenizer = tiny_bundle.model, tiny_bundle.tokenizer
    blocks = sample_blocks(model, tokenizer, count=4, length=16, seed=1)
    teacher = evaluate.teacher_topk(model, blocks, k=8)
    same = evaluate.quality(model, blocks, teacher, with_top1=True)
    assert same["top1"] == 1.0 and abs(same["kl"]) < 1e-6
    damaged = copy.deepcopy(model)
    with torch.no_grad():
        for layer in damaged.model.layers:
            layer.mlp.down_proj.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    worse = evaluate.quality(damaged, blocks, teacher, with_top1=True)
    assert (
        worse["top1"] < 0.5 and worse["kl"] > 1e-3 and worse["ppl"] > same["ppl"]
    )  # near-uniform tiny logits: small KLs
    assert "top1" not in evaluate.quality(model, blocks, teacher)  # only when asked for
    # the teacher's own pass gives its perplexity too (the baseline needs no second pass)
    with_nll = evaluate.teacher_topk(model, blocks, k=8, with_nll=True)
    assert abs(float(with_nll["nll"]) - same["nll"]) < 1e-5 and torch.equal(with_nll["index"], teacher["index"])


def test_prompts_of_unequal_length_write_what_each_writes_alone(tiny_bundle):
    model, tokenizer = tiny_bundle.model, tiny_bundle.tokenizer
    prompts = [[5, 6, 7, 8, 9], [11, 12], [13, 14, 15]]
    together = sample_blocks(model, tokenizer, 3, 16, 0, 1e-4, 3, prompts=prompts)  # left-padded, masked
    alone = torch.cat([sample_blocks(model, tokenizer, 1, 16, 0, 1e-4, 1, prompts=[p]) for p in prompts])
    assert torch.equal(together, alone)
    assert [together[i, : len(p)].tolist() for i, p in enumerate(prompts)] == prompts  # the prompt starts its row
    cycled = sample_blocks(model, tokenizer, 5, 16, 0, 1.0, 2, prompts=prompts)
    assert cycled[3, :5].tolist() == prompts[0] and cycled[4, :2].tolist() == prompts[1]


def test_nucleus_sampling_keeps_to_the_top_tokens(tiny_bundle):
    model, tokenizer = tiny_bundle.model, tiny_bundle.tokenizer
    blocks = sample_blocks(model, tokenizer, 4, 12, 0, 1.0, 4, top_p=1e-6)  # the top token alone: greedy
    with torch.no_grad():
        greedy = model(blocks, use_cache=False).logits[:, :-1].argmax(-1)
    assert float((greedy == blocks[:, 1:]).float().mean()) > 0.9
    assert not torch.equal(blocks, sample_blocks(model, tokenizer, 4, 12, 0, 1.0, 4))


def test_generated_text_is_written_once_per_model_and_settings_and_a_broken_cache_is_rewritten(
    tiny_bundle, tmp_path, caplog
):
    from birdbone.config import GeneratedText
    from birdbone.core.generate import generated_text, model_digest

    model, tokenizer = tiny_bundle.model, tiny_bundle.tokenizer
    source = GeneratedText(kind="generated", blocks=3, seed=5, batch_size=2)
    digest = model_digest(model)
    first, report = generated_text(model, tokenizer, source, 16, digest, cache_dir=tmp_path)
    assert not report["reused"] and first.shape == (3, 16)
    path = tmp_path / Path(report["path"]).name
    again, report2 = generated_text(model, tokenizer, source, 16, digest, cache_dir=tmp_path)
    assert report2["reused"] and torch.equal(first, again) and report2["key"] == report["key"]
    other, report3 = generated_text(
        model, tokenizer, source.model_copy(update={"seed": 6}), 16, digest, cache_dir=tmp_path
    )
    assert not report3["reused"] and report3["path"] != report["path"] and not torch.equal(first, other)
    # another model (one weight changed) writes its own text
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.lm_head.weight[0, 0] += 1.0
    assert model_digest(changed) != digest
    # a cache file that is garbage, or a link, is written anew, never trusted
    path.write_bytes(b"\x00" * 64)
    with caplog.at_level("WARNING"):
        rewritten, report4 = generated_text(model, tokenizer, source, 16, digest, cache_dir=tmp_path)
    assert not report4["reused"] and torch.equal(rewritten, first) and "is broken" in caplog.text
    target = tmp_path / "elsewhere.safetensors"
    path.rename(target)
    path.symlink_to(target)
    _, report5 = generated_text(model, tokenizer, source, 16, digest, cache_dir=tmp_path)
    assert not report5["reused"] and not path.is_symlink()


def test_prompts_longer_than_half_a_block_are_refused_with_the_fix(tiny_bundle):
    from birdbone.core.generate import chat_prompts
    from birdbone.errors import TextSourceError

    tokenizer = tiny_bundle.tokenizer
    assert all(len(p) <= 32 for p in chat_prompts(tokenizer, ["a short one", "another"], 32))
    with pytest.raises(TextSourceError, match=r"prompt 2 .* at most 8 \(half a block.*Fix: shorten it"):
        chat_prompts(tokenizer, ["hi", "a prompt far longer than eight tokens of this tokenizer"], 8)


def test_a_saved_model_is_named_by_its_sidecar_and_one_in_memory_by_its_weights(tiny_bundle, tmp_path):
    import json

    from birdbone.core.generate import model_digest
    from birdbone.core.io import sha256_json
    from birdbone.datasets import SIDECAR, ModelDataset, weights_digest

    assert weights_digest(tiny_bundle) == model_digest(tiny_bundle.model)  # no folder: the weights themselves
    ModelDataset(str(tmp_path / "m")).save(tiny_bundle)
    loaded = ModelDataset(str(tmp_path / "m")).load()
    hashes = json.loads((tmp_path / "m" / SIDECAR).read_text())["sha256"]
    assert hashes and weights_digest(loaded) == sha256_json(hashes)  # no second pass over the weights
    with torch.no_grad():
        tiny_bundle.model.lm_head.weight[0, 0] += 1.0
    tiny_bundle.path = None
    assert weights_digest(tiny_bundle) != model_digest(loaded.model)
