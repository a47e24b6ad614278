import json

import pytest
import torch

from birdbone.config import DataConfig
from birdbone.core.data import build_blocks, read_documents, tokenize_documents
from birdbone.errors import TextSourceError


def config(**kw):
    base = {
        "sources": [{"kind": "pydoc_topics"}],
        "block_size": 64,
        "splits": {"test": 4, "validation": 4, "calibration": 8, "healing": "rest"},
    }
    base.update(kw)
    return DataConfig.model_validate(base)


def test_splits_are_disjoint_sized_and_cover_contiguous_blocks(tiny_tokenizer):
    blocks, report = build_blocks(config(), tiny_tokenizer)
    assert [blocks[s].shape[0] for s in ("test", "validation", "calibration")] == [4, 4, 8]
    assert blocks["healing"].shape[0] == report["blocks"]["healing"] > 100
    rows = torch.cat([blocks[s] for s in ("test", "validation", "calibration", "healing")])
    assert rows.shape[1] == 64
    # each token position of the stream lands in exactly one split, in order
    cfg = config()
    stream = tokenize_documents(read_documents(cfg.sources), tiny_tokenizer, cfg.seed, True)
    assert torch.equal(rows.reshape(-1), stream[: rows.numel()])
    assert stream.numel() - rows.numel() < 64


def test_splits_are_seeded(tiny_tokenizer):
    a, _ = build_blocks(config(seed=1), tiny_tokenizer)
    b, _ = build_blocks(config(seed=1), tiny_tokenizer)
    c, _ = build_blocks(config(seed=2), tiny_tokenizer)
    assert all(torch.equal(a[s], b[s]) for s in a)
    assert not torch.equal(a["test"], c["test"])


def test_text_too_short_names_counts_and_fix(tmp_path, tiny_tokenizer):
    (tmp_path / "short.txt").write_text("Only a few words here.")
    cfg = config(sources=[{"kind": "txt", "path": str(tmp_path / "short.txt")}])
    with pytest.raises(TextSourceError) as err:
        build_blocks(cfg, tiny_tokenizer)
    message = str(err.value)
    assert "0 blocks of 64" in message and "ask for 16" in message
    assert "lower data.block_size" in message


def test_empty_text_is_an_error(tmp_path, tiny_tokenizer):
    (tmp_path / "empty.txt").write_text("  \n\n ")
    with pytest.raises(TextSourceError, match="holds no text"):
        build_blocks(config(sources=[{"kind": "txt", "path": str(tmp_path / "empty.txt")}]), tiny_tokenizer)


def test_binary_file_is_not_text(tmp_path, tiny_tokenizer):
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(TextSourceError, match="is not UTF-8 text"):
        build_blocks(config(sources=[{"kind": "txt", "path": str(tmp_path / "blob.txt")}]), tiny_tokenizer)


def test_jsonl_reads_the_named_field_and_names_a_bad_line(tmp_path, tiny_tokenizer):
    from pydoc_data.topics import topics

    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(topics.values())))
    blocks, report = build_blocks(
        config(sources=[{"kind": "jsonl", "path": str(path), "field": "body"}]), tiny_tokenizer
    )
    assert report["documents"] == len(topics)
    with pytest.raises(TextSourceError, match=r"docs.jsonl:1 has no field 'text' \(has: \['body', 'id'\]\)"):
        build_blocks(config(sources=[{"kind": "jsonl", "path": str(path)}]), tiny_tokenizer)


def test_txt_directory_and_saved_dataset(tmp_path, tiny_tokenizer):
    from pydoc_data.topics import topics

    import datasets

    texts = list(topics.values())
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(t)
    d = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})})
    d.save_to_disk(str(tmp_path / "ds"))
    a, ra = build_blocks(config(sources=[{"kind": "txt", "path": str(tmp_path / "txt")}]), tiny_tokenizer)
    b, rb = build_blocks(
        config(sources=[{"kind": "hf_dataset", "path": str(tmp_path / "ds"), "split": "train"}]), tiny_tokenizer
    )
    assert ra["documents"] == rb["documents"] == len(texts)
    assert ra["tokens"] == rb["tokens"]
    with pytest.raises(TextSourceError, match=r"holds splits \['train'\]"):
        build_blocks(config(sources=[{"kind": "hf_dataset", "path": str(tmp_path / "ds")}]), tiny_tokenizer)


def test_generated_text_is_mixed_into_calibration_and_healing_at_the_ratio_and_nowhere_else():
    from birdbone.core.data import interleave, mix_generated

    user = {
        name: torch.full((n, 4), i)
        for i, (name, n) in enumerate([("test", 4), ("validation", 4), ("calibration", 8), ("healing", 20)])
    }
    made = 100 + torch.arange(12)[:, None].expand(12, 4)  # row r: token 100 + r
    mixed, report = mix_generated(user, made, 0.5)
    assert torch.equal(mixed["test"], user["test"]) and torch.equal(mixed["validation"], user["validation"])
    calibration = mixed["calibration"][:, 0]
    assert calibration.tolist() == [2, 100, 2, 101, 2, 102, 2, 103]  # every prefix half generated, in order
    healing = mixed["healing"][:, 0]
    assert (healing >= 100).sum() == 8 and (healing < 100).sum() == 8 and healing.unique().numel() == 9
    assert healing[healing >= 100].tolist() == list(range(104, 112))  # the blocks calibration did not take
    assert report == {
        "ratio": 0.5,
        "blocks": 12,
        "calibration": 4,
        "healing": 8,
        "unused": 0,
        "user_healing_left_out": 12,
    }
    # more generated text than the ratio needs: the user's healing text is kept whole
    many = 100 + torch.arange(60)[:, None].expand(60, 4)
    mixed, report = mix_generated(user, many, 0.25)
    assert report["healing"] == 7 and report["user_healing_left_out"] == 0 and report["unused"] == 51
    # ratio 1: calibration and healing are generated text alone
    mixed, report = mix_generated(user, made, 1.0)
    assert bool((mixed["calibration"][:, 0] >= 100).all()) and mixed["healing"].shape[0] == 4
    # every prefix of an interleaving holds the second run's share, rounded down
    runs = interleave(torch.zeros(7, 1), torch.ones(3, 1))[:, 0]
    assert [int(runs[: k + 1].sum()) for k in range(10)] == [int((k + 1) * 0.3) for k in range(10)]


def test_a_generated_source_needs_text_of_yours_and_another_seed_than_the_general_split():
    gen = {"kind": "generated", "blocks": 8}
    assert config(sources=[{"kind": "pydoc_topics"}, gen]).generated().blocks == 8
    with pytest.raises(ValueError, match="only generated text: the test and validation splits need text of yours"):
        config(sources=[gen])
    with pytest.raises(ValueError, match="more than one"):
        config(sources=[{"kind": "pydoc_topics"}, gen, gen])
    with pytest.raises(ValueError, match="healing would train on the text the general split judges"):
        config(sources=[{"kind": "pydoc_topics"}, {**gen, "seed": 1}], general={"blocks": 4, "seed": 1})
    assert config(sources=[{"kind": "pydoc_topics"}, {**gen, "seed": 1}], general={"blocks": 0, "seed": 1})


def test_general_text_you_name_is_cut_into_blocks_and_must_not_be_your_training_text(tmp_path, tiny_tokenizer):
    from birdbone.core.data import general_text_blocks

    other = tmp_path / "other.txt"
    other.write_text("Rivers carry water from the hills down to the sea, year after year. " * 40)
    named = general_text_blocks(
        config(general={"sources": [{"kind": "txt", "path": str(other)}], "text_blocks": 3}), tiny_tokenizer
    )
    assert named.shape == (3, 64) and named.dtype == torch.int64
    asked = config(general={"sources": [{"kind": "txt", "path": str(other)}], "text_blocks": 10_000})
    assert 3 < general_text_blocks(asked, tiny_tokenizer).shape[0] < 10_000  # what there is, with a warning
    mine = tmp_path / "mine.txt"
    mine.write_text(other.read_text())
    shared = config(
        sources=[{"kind": "txt", "path": str(mine)}], general={"sources": [{"kind": "txt", "path": str(other)}]}
    )
    with pytest.raises(
        TextSourceError, match="shares 1 document.*Fix: name general text that is not among data.sources"
    ):
        general_text_blocks(shared, tiny_tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(TextSourceError, match="less than one block of 64"):
        general_text_blocks(config(general={"sources": [{"kind": "txt", "path": str(short)}]}), tiny_tokenizer)
