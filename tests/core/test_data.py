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
