import math

import pytest
import torch

from birdbone.config import SpectraConfig, SpeedConfig
from birdbone.core import evaluate, spectra, speed
from tests.conftest import blocks_of


def test_perplexity_matches_transformers_loss(tiny_bundle):
    blocks = blocks_of(6, 512, length=48)
    ours = evaluate.perplexity(tiny_bundle.model, blocks, batch_size=4)
    with torch.no_grad():
        hf = tiny_bundle.model(blocks, labels=blocks).loss
    assert ours["tokens"] == 6 * 47
    assert abs(ours["ppl"] / math.exp(float(hf)) - 1) < 0.005
    assert evaluate.perplexity(tiny_bundle.model, blocks, batch_size=1)["ppl"] == pytest.approx(ours["ppl"], rel=1e-5)


def test_perplexity_rejects_wrong_shapes(tiny_bundle):
    with pytest.raises(ValueError, match="needs a \\[blocks, length>=2\\] tensor"):
        evaluate.perplexity(tiny_bundle.model, torch.zeros(5, dtype=torch.long))


def test_size_report_counts_tied_weights_once_and_sees_zeros(tiny_bundle, tmp_path):
    from birdbone.core.modeling import save_model

    model = tiny_bundle.model
    expected = sum(p.numel() for p in model.parameters())
    assert evaluate.parameter_count(model) == expected
    model.lm_head.weight = model.model.embed_tokens.weight
    assert evaluate.parameter_count(model) == expected - model.lm_head.weight.numel()
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.weight[:, : layer.weight.shape[1] // 4] = 0
    save_model(tiny_bundle, tmp_path)
    tiny_bundle.path = tmp_path
    report = evaluate.size_report(tiny_bundle)
    assert report["density"]["model.layers.0.mlp.up_proj"] == pytest.approx(0.75)
    assert report["density"]["model.layers.1.mlp.up_proj"] == 1.0
    assert report["bytes"] == (tmp_path / "model.safetensors").stat().st_size


def test_spectrum_of_a_low_rank_matrix():
    torch.manual_seed(0)
    u, v = torch.randn(200, 3), torch.randn(3, 120)
    weight = u @ v + 1e-4 * torch.randn(200, 120)
    result = spectra.spectrum(weight, k=10, method="lowrank", niter=2, energy_levels=[0.5, 0.9999])
    exact = torch.linalg.svdvals(weight)[:10]
    assert torch.allclose(torch.tensor(result["singular_values"][:3]), exact[:3], rtol=1e-4)
    assert result["explained"][2] > 0.9999
    assert result["rank_at"]["0.9999"] <= 3
    assert len(result["explained"]) == 10


def test_spectral_scan_is_repeatable(tiny_bundle):
    weights = {n: m.weight for n, m in tiny_bundle.adapter.linears(tiny_bundle.model).items()}
    cfg = SpectraConfig(top_k=8)
    a = spectra.spectral_scan(weights, cfg, seed=1)
    b = spectra.spectral_scan(weights, cfg, seed=1)
    assert a == b and len(a) == 14


def test_speed_reports_positive_rates(tiny_bundle):
    cfg = SpeedConfig(prompt_tokens=4, decode_tokens=4, prefill_tokens=16, repeats=2, warmup=0)
    result = speed.measure_speed(tiny_bundle.model, torch.arange(10), cfg, torch.device("cpu"))
    assert result["decode_tokens_per_s"] > 0 and result["prefill_tokens_per_s"] > 0
    assert len(result["decode_seconds"]) == 2
