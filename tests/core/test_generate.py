"""The general split: text the dense model writes itself, seeded, and the measures on it."""

import copy

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
