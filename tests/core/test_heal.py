"""LoRA healing on the tiny model: masks kept bit for bit, loss down, NaN undone, gating."""

import pytest
import torch

from birdbone.config import HealConfig, UnstructuredPattern
from birdbone.core import evaluate
from birdbone.core.heal import check_heal, heal_
from birdbone.core.masks import MaskSet
from birdbone.core.prune import prune_
from birdbone.errors import HealError
from tests.conftest import blocks_of


def patterned(count, length=32, seed=0):
    """Learnable text: each block counts up by a block-specific stride (mod 97)."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 97, (count, 1), generator=generator)
    stride = torch.randint(1, 5, (count, 1), generator=generator)
    return (start + stride * torch.arange(length)) % 97


def weights(bundle):
    return {f"{n}.weight": m.weight.detach().clone() for n, m in bundle.adapter.linears(bundle.model).items()}


def pruned(bundle):
    masks, _ = prune_(bundle, "wanda", UnstructuredPattern(kind="unstructured", sparsity=0.5), blocks_of(4, 512))
    return masks


def config(**extra):
    base = {"steps": 30, "lr": 1e-2, "rank": 4, "batch_size": 4, "block_length": None, "eval_every": 10}
    return HealConfig(**{**base, **extra})


def test_healing_keeps_the_masks_bit_for_bit_and_lowers_the_loss(tiny_bundle):
    masks = pruned(tiny_bundle)
    data, validation = patterned(64), patterned(8, seed=5)
    before = weights(tiny_bundle)
    ppl_before = evaluate.perplexity(tiny_bundle.model, validation)["ppl"]
    report = heal_(tiny_bundle, masks, data, config(), validation=validation)
    after = weights(tiny_bundle)
    assert report.merged and report.stopped is None
    assert MaskSet.from_weights(after).equals(masks)  # same zeros, exactly: nothing pruned came back
    assert all(not torch.equal(after[n], before[n]) for n in after)  # every targeted Linear moved
    assert evaluate.perplexity(tiny_bundle.model, validation)["ppl"] < 0.9 * ppl_before
    losses = [p["loss"] for p in report.curve if "loss" in p]
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert [p["step"] for p in report.curve if "val_ppl" in p] == [0, 10, 20, 30]
    assert report.samples_trained == report.samples_seen == 120


def test_distillation_adds_the_kl_to_the_teacher(tiny_bundle):
    data = patterned(16)
    teacher = evaluate.teacher_topk(tiny_bundle.model, data, k=8)
    masks = pruned(tiny_bundle)
    report = heal_(tiny_bundle, masks, data, config(steps=4, distill=1.0), teacher=teacher)
    assert all(p["loss"] == pytest.approx(p["ce"] + p["kl"], rel=1e-5) for p in report.curve if "loss" in p)


def test_live_distillation_learns_the_dense_models_whole_distribution(tiny_bundle):
    import copy

    data = patterned(16)
    dense = copy.deepcopy(tiny_bundle.model)
    full = evaluate.teacher_topk(dense, data, k=dense.config.vocab_size)
    with torch.no_grad():  # the whole vocabulary as top-k: the coarsened KL is the exact one
        student = tiny_bundle.model(data, use_cache=False).logits[:, :-1]
        target = dense(data, use_cache=False).logits[:, :-1]
    noisy = student + 0.3 * torch.randn(student.shape, generator=torch.Generator().manual_seed(0))
    exact = evaluate.full_kl(target, noisy)
    assert torch.allclose(exact, evaluate.topk_kl(full["logprob"], full["index"], noisy), atol=1e-5)
    assert float(exact.min()) > 0 and torch.allclose(evaluate.full_kl(target, target), 0 * exact, atol=1e-5)
    masks = pruned(tiny_bundle)

    def kl_to_dense():
        with torch.no_grad():
            return float(evaluate.full_kl(target, tiny_bundle.model(data, use_cache=False).logits[:, :-1]).mean())

    before = kl_to_dense()
    settings = config(steps=20, lr=1e-3, distill=1.0, ce_weight=0.0, distill_top_k=None)
    report = heal_(tiny_bundle, masks, data, settings, teacher=dense)
    assert report.merged and all(p["loss"] == pytest.approx(p["kl"], rel=1e-5) for p in report.curve if "loss" in p)
    assert kl_to_dense() < 0.75 * before and MaskSet.from_weights(weights(tiny_bundle)).equals(masks)
    assert not any(p.requires_grad for p in dense.parameters())  # the teacher is only read


def test_a_learning_rate_that_blows_up_is_stopped_and_undone(tiny_bundle):
    masks = pruned(tiny_bundle)
    before = weights(tiny_bundle)
    settings = config(steps=10, warmup=0.0, max_grad_norm=1e30)
    report = heal_(tiny_bundle, masks, patterned(32), settings, lr=1e20)  # the library takes any learning rate
    assert report.stopped is not None and "non-finite" in report.stopped and not report.merged
    after = weights(tiny_bundle)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_a_nan_loss_stops_healing_at_once(tiny_bundle):
    data = patterned(16)
    teacher = evaluate.teacher_topk(tiny_bundle.model, data, k=8)
    teacher["logprob"][3, 5, 0] = float("nan")  # a corrupt cache entry
    before = weights(tiny_bundle)
    report = heal_(tiny_bundle, None, data, config(steps=30, distill=1.0, batch_size=16), teacher=teacher)
    assert report.stopped.startswith("non-finite loss (nan) at step 1") and report.tokens_trained == 0
    assert all(torch.equal(w, before[n]) for n, w in weights(tiny_bundle).items())


def test_bad_lora_settings_are_named_before_compute(tiny_bundle):
    with pytest.raises(HealError, match=r"heal.targets \['qkv_proj'\] match no Linear.*Fix: heal.targets"):
        check_heal(tiny_bundle, config(targets=["qkv_proj"]))
    with pytest.raises(HealError, match=r"heal.rank 40 is larger than .*k_proj \(32 x 64\).*Fix: heal.rank <= 32"):
        check_heal(tiny_bundle, config(rank=40))


def test_gating_holds_the_trained_share_near_its_target(tiny_bundle):
    gating = {"enabled": True, "target_rate": 0.25}
    report = heal_(tiny_bundle, None, patterned(64), config(steps=20, gating=gating, eval_every=0))
    assert report.samples_trained == 80
    assert 0.15 <= report.samples_trained / report.samples_seen <= 0.4


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
def test_qlora_trains_on_4bit_and_merges_into_the_full_precision_weights(tiny_bundle):
    masks = pruned(tiny_bundle)
    data, validation = patterned(64), patterned(8, seed=5)
    tiny_bundle.model.to("cuda")
    ppl_before = evaluate.perplexity(tiny_bundle.model, validation, device="cuda")["ppl"]
    settings = config(quantize="nf4", compute_dtype="bfloat16")
    report = heal_(tiny_bundle, masks, data, settings, validation=validation, device="cuda")
    assert report.merged and report.stopped is None
    after = {n: w.cpu() for n, w in weights(tiny_bundle).items()}
    assert all(w.dtype == torch.float32 for w in after.values())  # merged into full precision, not 4-bit
    assert MaskSet.from_weights(after).equals(masks)
    assert evaluate.perplexity(tiny_bundle.model, validation, device="cuda")["ppl"] < 0.9 * ppl_before


def test_pruned_weights_stay_positive_zero_so_a_healed_wave_removes_only_what_it_pruned(tiny_bundle):
    from birdbone.core.masks import WaveDelta

    masks = pruned(tiny_bundle)
    assert not any(torch.signbit(w[w == 0]).any() for w in weights(tiny_bundle).values())  # +0.0, not -0.0
    heal_(tiny_bundle, masks, patterned(16), config(steps=3))
    before = weights(tiny_bundle)
    assert not any(torch.signbit(w[w == 0]).any() for w in before.values())
    # the next wave: prune more, heal again; its delta removes exactly the newly pruned weights
    more, _ = prune_(
        tiny_bundle, "wanda", UnstructuredPattern(kind="unstructured", sparsity=0.7), blocks_of(4, 512), prior=masks
    )
    heal_(tiny_bundle, more, patterned(16), config(steps=3))
    delta = WaveDelta.between(before, weights(tiny_bundle))
    newly = sum(int((masks[n] & ~more[n]).sum()) for n in masks)
    assert delta.removed() == newly


def test_a_zero_whose_sign_flipped_is_no_removed_weight_and_is_restored_bit_for_bit():
    from birdbone.core.masks import WaveDelta

    before = {"w": torch.tensor([-0.0, 1.0, 2.0, 0.0])}
    after = {"w": torch.tensor([0.0, 0.0, 2.5, -0.0])}
    delta = WaveDelta.between(before, after)
    assert delta.removed() == 1 and delta.params["w"].removed_index.tolist() == [1]
    target = {"w": after["w"].clone()}
    delta.invert_(target)
    assert target["w"].view(torch.int32).tolist() == before["w"].view(torch.int32).tolist()


def rounded(bundle, grid, masks):
    """A copy of ``bundle``'s model with every block Linear rounded to ``grid`` (masks kept)."""
    import copy

    from birdbone.core.quantize import rtn

    model = copy.deepcopy(bundle.model)
    for name, linear in bundle.adapter.linears(model).items():
        linear.weight.data = rtn(linear.weight.data, grid, masks[f"{name}.weight"])[0]
    return model


def test_fake_quant_healing_trains_against_the_grid_and_merges_into_the_original_weights(tiny_bundle):
    import copy

    from birdbone.core.quantize import Grid

    grid = Grid(2, 32, True)
    masks = pruned(tiny_bundle)
    data, validation = patterned(64), patterned(8, seed=5)
    plain = copy.deepcopy(tiny_bundle)
    grids = {name: grid for name in weights(tiny_bundle)}
    start_rounded = evaluate.perplexity(rounded(tiny_bundle, grid, masks), validation[:4])["ppl"]  # curve_blocks
    report = heal_(tiny_bundle, masks, data, config(), validation=validation, fake_quant=grids)
    assert report.merged
    # the curve is the rounded model's: at step 0 (adapters zero) exactly the rounded start
    assert report.curve[0]["val_ppl"] == pytest.approx(start_rounded, rel=1e-5)
    assert MaskSet.from_weights(weights(tiny_bundle)).equals(masks)
    heal_(plain, masks, data, config(), validation=validation)
    # the merge went into the full-precision weights, not the rounded ones
    assert not all(on for on in (_on(tiny_bundle, grid, masks)))
    # trained around the grid, the rounded model is better than the plainly healed one rounded
    qat = evaluate.perplexity(rounded(tiny_bundle, grid, masks), validation)["ppl"]
    direct = evaluate.perplexity(rounded(plain, grid, masks), validation)["ppl"]
    assert qat < direct


def _on(bundle, grid, masks):
    from birdbone.core.quantize import on_grid

    return [on_grid(w, grid, masks[n]) for n, w in weights(bundle).items()]


def test_gradient_checkpointing_trains_the_same_and_is_switched_off_after(tiny_tokenizer):
    from birdbone.core import modeling

    results = []
    for checkpointing in (False, True):
        model = modeling.tiny_model(vocab=len(tiny_tokenizer), seed=0)
        bundle = modeling.ModelBundle(model, tiny_tokenizer, modeling.adapter_for(model))
        masks = pruned(bundle)
        report = heal_(bundle, masks, patterned(16), config(steps=4, gradient_checkpointing=checkpointing))
        assert report.merged and not model.is_gradient_checkpointing
        assert MaskSet.from_weights(weights(bundle)).equals(masks)
        results.append((weights(bundle), [p["loss"] for p in report.curve if "loss" in p]))
    (plain, plain_loss), (recomputed, recomputed_loss) = results
    assert recomputed_loss == pytest.approx(plain_loss, rel=1e-5)
    assert all(torch.allclose(plain[n], recomputed[n], atol=1e-6) for n in plain)
