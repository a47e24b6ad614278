import pytest
import torch

from birdbone.config import BlocksPattern, HeadsPattern, MLPChannelsPattern
from birdbone.core import modeling, structure
from birdbone.core.prune.structured import prune_structure_
from birdbone.errors import PruneError
from tests.conftest import blocks_of


def calibration():
    return blocks_of(6, 512, length=32, seed=2)


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def test_removing_dead_mlp_channels_leaves_outputs_unchanged(tiny_bundle):
    model = tiny_bundle.model
    dead = torch.arange(0, 128, 4)  # 32 of 128 channels write nothing
    for block in model.model.layers:
        with torch.no_grad():
            block.mlp.down_proj.weight[:, dead] = 0
    ids = blocks_of(2, 512, length=20, seed=9)
    before = logits(model, ids)
    report = prune_structure_(
        tiny_bundle, MLPChannelsPattern(kind="mlp_channels", ratio=0.25, multiple=32), calibration()
    )
    for block in model.model.layers:
        assert block.mlp.gate_proj.weight.shape == (96, 64)
        assert block.mlp.down_proj.weight.shape == (64, 96)
    assert torch.allclose(logits(model, ids), before, atol=1e-5)
    assert model.config.intermediate_size == 96 and not hasattr(model.config, structure.LAYER_SHAPES)
    assert report["params_after"] == report["params_before"] - 2 * 3 * 32 * 64


def test_removing_silent_query_heads_leaves_outputs_unchanged(tiny_bundle):
    model = tiny_bundle.model  # 4 query heads in 2 KV groups, head_dim 16
    for block in model.model.layers:
        with torch.no_grad():
            block.self_attn.o_proj.weight[:, 16:32] = 0  # head 1 (group 0) is silent
            block.self_attn.o_proj.weight[:, 32:48] = 0  # head 2 (group 1) is silent
    ids = blocks_of(2, 512, length=20, seed=9)
    before = logits(model, ids)
    prune_structure_(tiny_bundle, HeadsPattern(kind="heads", ratio=0.5, mode="query"), calibration())
    attention = model.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (32, 64) and attention.k_proj.weight.shape == (32, 64)
    assert attention.num_key_value_groups == 1
    assert torch.allclose(logits(model, ids), before, atol=1e-5)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 2


def test_kv_group_removal_keeps_the_louder_group(tiny_bundle):
    model = tiny_bundle.model
    for block in model.model.layers:
        with torch.no_grad():
            block.self_attn.o_proj.weight[:, :32] = 0  # group 0 (heads 0, 1) silent
    ids = blocks_of(2, 512, length=20, seed=9)
    before = logits(model, ids)
    prune_structure_(tiny_bundle, HeadsPattern(kind="heads", ratio=0.5, mode="kv_groups"), calibration())
    attention = model.model.layers[1].self_attn
    assert attention.q_proj.out_features == 32 and attention.k_proj.out_features == 16
    assert attention.num_key_value_groups == 2
    assert torch.allclose(logits(model, ids), before, atol=1e-5)


def test_block_removal_drops_the_least_influential_and_decodes_with_cache(tiny_tokenizer):
    model = modeling.tiny_model(layers=3, vocab=len(tiny_tokenizer))
    with torch.no_grad():  # block 1 adds nothing to the residual stream: influence 0
        model.model.layers[1].self_attn.o_proj.weight.zero_()
        model.model.layers[1].mlp.down_proj.weight.zero_()
    bundle = modeling.ModelBundle(model, tiny_tokenizer, modeling.adapter_for(model))
    ids = blocks_of(2, 512, length=20, seed=9)
    before = logits(model, ids)
    report = prune_structure_(bundle, BlocksPattern(kind="blocks", count=1), calibration())
    assert report["removed"]["blocks"] == [1]
    assert report["removed"]["influence"][1] == pytest.approx(0.0, abs=1e-6)
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    assert torch.allclose(logits(model, ids), before, atol=1e-5)
    out = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_uniform_result_loads_in_stock_transformers(tiny_bundle, tmp_path):
    from transformers import AutoModelForCausalLM

    prune_structure_(tiny_bundle, MLPChannelsPattern(kind="mlp_channels", ratio=0.5, multiple=16), calibration())
    modeling.save_model(tiny_bundle, tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = blocks_of(1, 512, length=12)
    assert torch.equal(logits(stock, ids), logits(tiny_bundle.model, ids))


def test_uneven_widths_round_trip_through_our_loader(tiny_bundle, tmp_path):
    model, adapter = tiny_bundle.model, tiny_bundle.adapter
    structure.keep_mlp_channels_(model.model.layers[0].mlp, torch.arange(0, 128, 2), adapter)
    structure.keep_heads_(model.model.layers[1].self_attn, torch.tensor([0, 2]), torch.tensor([0, 1]), 16, adapter)
    structure.record_shapes(model, adapter)
    shapes = getattr(model.config, structure.LAYER_SHAPES)
    assert shapes == [
        {"intermediate_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2},
        {"intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2},
    ]
    modeling.save_model(tiny_bundle, tmp_path)
    loaded = modeling.load_model_dir(tmp_path)
    ids = blocks_of(1, 512, length=12)
    assert torch.equal(logits(loaded.model, ids), logits(model, ids))
    assert structure.layer_shapes(loaded.model, loaded.adapter) == shapes


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            MLPChannelsPattern(kind="mlp_channels", ratio=0.999, multiple=1),
            "would remove every one of its 128 channels",
        ),
        (HeadsPattern(kind="heads", ratio=0.1, mode="query"), "removes no head"),
        (HeadsPattern(kind="heads", ratio=0.9, mode="kv_groups"), "would remove every attention head"),
        (BlocksPattern(kind="blocks", count=2), "would leave none of 2"),
    ],
)
def test_impossible_structured_requests_fail_before_compute(tiny_bundle, pattern, message):
    before = {k: v.clone() for k, v in tiny_bundle.model.state_dict().items()}
    with pytest.raises(PruneError, match=message):
        prune_structure_(tiny_bundle, pattern, calibration())
    after = tiny_bundle.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_magnitude_and_wanda_criteria_differ_on_loud_channels(tiny_tokenizer):
    """32 channels with quieter down weights but 40x louder activations: Wanda's score keeps
    them, weight magnitude alone drops exactly those."""
    loud_kept = {}
    for criterion in ("magnitude", "wanda"):
        model = modeling.tiny_model(vocab=len(tiny_tokenizer), seed=3)
        with torch.no_grad():
            for block in model.model.layers:
                block.mlp.down_proj.weight[:, :32] *= 0.5
                block.mlp.up_proj.weight[:32] *= 40.0
        threshold = 10 * float(model.model.layers[0].mlp.up_proj.weight.detach()[32:].norm(dim=1).max())
        bundle = modeling.ModelBundle(model, tiny_tokenizer, modeling.adapter_for(model))
        pattern = MLPChannelsPattern(kind="mlp_channels", ratio=0.25)
        report = prune_structure_(bundle, pattern, calibration(), criterion=criterion)
        assert report["criterion"] == criterion
        loud_kept[criterion] = [int((b.mlp.up_proj.weight.norm(dim=1) > threshold).sum()) for b in model.model.layers]
    assert loud_kept == {"magnitude": [0, 0], "wanda": [32, 32]}
    with pytest.raises(PruneError, match="known: magnitude, wanda"):
        prune_structure_(None, MLPChannelsPattern(kind="mlp_channels", ratio=0.25), calibration(), criterion="taylor")


def test_head_ratio_rounding_is_reported(tiny_tokenizer, caplog):
    model = modeling.tiny_model(vocab=len(tiny_tokenizer), hidden=96, heads=6, kv_heads=2)  # 3 query heads per group
    bundle = modeling.ModelBundle(model, tiny_tokenizer, modeling.adapter_for(model))
    with caplog.at_level("WARNING"):
        report = prune_structure_(bundle, HeadsPattern(kind="heads", ratio=0.25, mode="query"), calibration())
    assert "heads ratio 0.25 removes 2 of 6 heads (0.333)" in caplog.text
    assert [s["num_attention_heads"] for s in report["shapes"]] == [4, 4]
