import torch

from birdbone.core.walk import InputStats, calibration_walk
from tests.conftest import blocks_of


class Recorder:
    """A no-op method that keeps what the walk hands it."""

    needs_inputs = True
    needs_gram = True
    needs_frequency = True

    def __init__(self):
        self.stats = {}

    def process(self, index, block, linears, stats):
        self.stats[index] = stats


def test_walk_carries_the_model_own_hidden_states(tiny_bundle):
    blocks = blocks_of(6, 512, length=24)
    layer_inputs = []
    for block in tiny_bundle.adapter.blocks(tiny_bundle.model):
        block.register_forward_pre_hook(
            lambda m, args, kwargs: layer_inputs.append(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    with torch.no_grad():
        tiny_bundle.model(blocks, use_cache=False)
    recorder = Recorder()
    captured = {}
    linear = tiny_bundle.model.model.layers[1].self_attn.q_proj
    linear.register_forward_hook(lambda m, args, out: captured.setdefault("x", []).append(args[0]))
    calibration_walk(tiny_bundle, blocks, recorder, batch_size=4)
    # block 1's statistics were computed from the true input of block 1 (after block 0)
    x = torch.cat(captured["x"][:2]).reshape(-1, 64)  # first pass of block 1: its two batches
    stats = recorder.stats[1]["self_attn.q_proj"]
    assert stats.tokens == 6 * 24
    assert torch.allclose(stats.sq_sum.float(), x.pow(2).sum(0), rtol=1e-5)
    assert torch.allclose(stats.hessian(), 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    normed = tiny_bundle.model.model.layers[1].input_layernorm(layer_inputs[1])
    assert torch.allclose(x, normed.reshape(-1, 64), atol=1e-6)


def test_shared_inputs_give_the_same_statistics_as_separate_ones(tiny_bundle):
    recorder = Recorder()
    calibration_walk(tiny_bundle, blocks_of(4, 512, length=16), recorder, batch_size=2)
    stats = recorder.stats[0]
    for a, b in [("self_attn.q_proj", "self_attn.k_proj"), ("mlp.gate_proj", "mlp.up_proj")]:
        assert torch.equal(stats[a].sq_sum, stats[b].sq_sum)
        assert torch.equal(stats[a].gram, stats[b].gram)
    # o_proj sees the attention output, not the block input, although the shapes match
    assert not torch.equal(stats["self_attn.o_proj"].sq_sum, stats["self_attn.q_proj"].sq_sum)
    assert stats["mlp.down_proj"].features == 128


def test_frequency_counts_active_channels():
    stats = InputStats(3, want_frequency=True, eps=0.5)
    stats.add(torch.tensor([[1.0, 0.1, -2.0], [0.0, 0.2, 3.0]]))
    assert torch.allclose(stats.frequency(), torch.tensor([0.5, 0.0, 1.0]))


class HalveFirstLinears:
    """Changes every Linear in place (as pruning does) and keeps the block outputs."""

    needs_inputs = True
    needs_gram = False
    needs_frequency = False

    def __init__(self):
        self.outputs = {}

    def process(self, index, block, linears, stats):
        with torch.no_grad():
            for linear in linears.values():
                linear.weight.mul_(0.5)

    def after_block(self, index, inputs, outputs):
        self.outputs[index] = (inputs, outputs)


def test_rerun_under_autocast_uses_the_changed_weights(tiny_bundle):
    """Autocast caches low-precision weight copies and misses in-place changes: the walk
    must rerun a changed block with its new weights, not the cached old ones."""
    blocks = blocks_of(4, 512, length=16)
    method = HalveFirstLinears()
    calibration_walk(tiny_bundle, blocks, method, batch_size=4, compute_dtype=torch.bfloat16)
    inputs, outputs = method.outputs[0]
    block = tiny_bundle.adapter.blocks(tiny_bundle.model)[0]
    from birdbone.core.walk import capture_block_inputs, run_block

    captured = capture_block_inputs(tiny_bundle.model, block, blocks, 4, torch.device("cpu"))
    torch.clear_autocast_cache()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = run_block(block, captured)
    torch.clear_autocast_cache()
    assert torch.equal(outputs[0], expected[0])
