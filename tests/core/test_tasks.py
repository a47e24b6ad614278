import json

import pytest
import torch

from birdbone.core import tasks
from birdbone.errors import TaskFileError


def test_continuation_logprob_is_the_sum_over_continuation_tokens(tiny_bundle):
    model, tok = tiny_bundle.model, tiny_bundle.tokenizer
    ctx, cont = "Question: what is it?\nAnswer:", " a cat"
    total, n = tasks.continuation_logprob(model, tok, ctx, cont, torch.device("cpu"))
    ids = tok(ctx + cont)["input_ids"]
    n_ctx = len(tok(ctx)["input_ids"])
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    manual = sum(float(logp[i - 1, ids[i]]) for i in range(n_ctx, len(ids)))
    assert n == len(ids) - n_ctx
    assert total == pytest.approx(manual, abs=1e-4)


def test_multiple_choice_picks_the_likeliest_choice(tiny_bundle, tmp_path, monkeypatch):
    items = [
        {"question": "Q", "choices": ["aa", "bb", "cc"], "answer": 1},
        {"question": "Q", "choices": ["aa", "bb"], "answer": 0},
    ]
    path = tmp_path / "mc.jsonl"
    path.write_text("\n".join(json.dumps(i) for i in items))
    scores = {" aa": -5.0, " bb": -1.0, " cc": -9.0}
    monkeypatch.setattr(tasks, "continuation_logprob", lambda m, t, q, c, d: (scores[c], 1))
    result = tasks.score_task_file(
        tiny_bundle.model, tiny_bundle.tokenizer, "multiple_choice", path, torch.device("cpu")
    )
    assert result["n"] == 2 and result["accuracy"] == 0.5


def test_canary_exact_match_on_the_model_own_continuation(tiny_bundle, tmp_path):
    model, tok = tiny_bundle.model, tiny_bundle.tokenizer
    own = tasks.greedy_continuation(model, tok, "The answer is", 6, torch.device("cpu"))
    path = tmp_path / "c.jsonl"
    path.write_text(
        json.dumps({"prompt": "The answer is", "expected": own})
        + "\n"
        + json.dumps({"prompt": "x", "expected": "\u2603\u2603"})
    )
    result = tasks.score_task_file(model, tok, "canary", path, torch.device("cpu"))
    assert result["n"] == 2
    if own.strip():
        assert result["exact_match"] == 0.5
    assert result["mean_token_logprob"] < 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"question": "q", "choices": ["a"], "answer": 0}', "at least two strings"),
        ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "must be the index"),
        ('{"question": "q", "answer": 0}', "lacks \\['choices'\\]"),
        ("not json", "is not valid JSON"),
    ],
)
def test_bad_multiple_choice_files_are_named(tiny_bundle, tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(TaskFileError, match=message):
        tasks.score_task_file(tiny_bundle.model, tiny_bundle.tokenizer, "multiple_choice", path, torch.device("cpu"))
