"""RigL regrowth: density exactly constant, regrown connections start at zero and were
pruned, the dropped ones were the weakest active; an undo puts the masks back."""

import torch

from birdbone.config import DecayConfig, UnstructuredPattern
from birdbone.core import waves
from birdbone.core.profile import gradient_magnitude
from birdbone.core.prune import prune_
from birdbone.core.regrow import regrow_
from tests.conftest import blocks_of


def test_regrowth_swaps_connections_at_constant_density(tiny_bundle):
    masks, _ = prune_(tiny_bundle, "wanda", UnstructuredPattern(kind="unstructured", sparsity=0.5), blocks_of(4, 512))
    linears = {f"{n}.weight": m.weight for n, m in tiny_bundle.adapter.linears(tiny_bundle.model).items()}
    before = {n: w.detach().clone() for n, w in linears.items()}
    gradients = gradient_magnitude(tiny_bundle, blocks_of(2, 512, seed=4))
    new, report = regrow_(tiny_bundle, masks, blocks_of(2, 512, seed=4), 0.05)
    assert report["swapped"] > 0
    for name, mask in masks.items():
        grown = new[name] & ~mask
        dropped = mask & ~new[name]
        assert new.kept(name) == masks.kept(name)  # density exactly constant, per layer
        assert int(grown.sum()) == int(dropped.sum()) == int(0.05 * int((~mask).sum()))
        assert bool((linears[name][grown] == 0).all())  # regrown start at zero
        assert bool((linears[name][dropped] == 0).all())
        kept = mask & ~dropped
        if dropped.any():  # the dropped were the active weights of least |W * dL/dW|
            taylor = (before[name] * gradients[name]).abs()
            assert taylor[dropped].max() <= taylor[kept].min()


def test_a_wave_with_regrowth_is_undone_to_the_exact_masks(tiny_bundle):
    from birdbone.config import RegrowConfig

    config = DecayConfig(
        method="wanda",
        pattern={"kind": "unstructured", "sparsity": 0.5},
        cap=0.2,
        gate={"step_limit": 0.03, "strikes": 2, "budget": None, "rollback": "full"},
    )
    state = waves.start(tiny_bundle, {"ppl": 10.0}, "origin")
    healing = blocks_of(4, 512, seed=8)
    regrow = RegrowConfig(enabled=True, fraction=0.1, blocks=2)

    def wave(k, ppl):
        waves.decay(state, k, config, blocks_of(4, 512, length=32, seed=k), None)
        waves.regrow(state, regrow, healing)
        state.current.update(ppl=ppl, kl=0.0)
        waves.gate(state, config, "recipe")

    wave(1, 10.1)
    accepted = state.masks.copy()
    weights = {n: w.detach().clone() for n, w in state.linears().items()}
    assert state.rows[-1]["regrow"]["swapped"] > 0
    wave(2, 12.0)
    wave(3, 13.0)
    assert state.rows[-1]["decision"] == "reverted"
    assert state.masks.equals(accepted)
    assert all(torch.equal(w, weights[n]) for n, w in state.linears().items())
