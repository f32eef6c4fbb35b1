"""SQuAD v2.0: official-style metrics, answer-span mapping, windows and answer selection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distml.data.qa_tokenizer import WordTokenizer
from distml.data.squad import (
    SquadExample,
    SquadFeatures,
    answer_char_span,
    char_span_to_tokens,
    context_windows,
    read_squad,
)
from distml.data.squad_metrics import (
    exact_match,
    f1_score,
    normalize_answer,
    select_answers,
    squad_scores,
)
from distml.errors import UserError


def _ex(
    qid: str, context: str, answers: tuple[tuple[str, int], ...] = (), question: str = "q?"
) -> SquadExample:
    return SquadExample(
        qid=qid,
        question=question,
        context=context,
        answers=tuple(a for a, _ in answers),
        answer_starts=tuple(s for _, s in answers),
        is_impossible=not answers,
    )


# ---------------------------------------------------------------- metrics
def test_normalize_answer_matches_the_official_rules() -> None:
    assert normalize_answer("The  Quick, brown fox!") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_exact_match_and_f1_hand_computed() -> None:
    assert exact_match("The Eiffel Tower", "eiffel tower.") == 1.0
    assert exact_match("Eiffel Tower", "Tower") == 0.0
    # gold {cat, sat}, prediction {cat, sat, on, mat}: P = 2/4, R = 2/2, F1 = 2/3.
    assert f1_score("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # Repeated tokens count by multiplicity: gold [new, new, york], pred [new, york]: overlap 2, P = 1, R = 2/3, F1 = 0.8.
    assert f1_score("new new york", "new york") == pytest.approx(0.8)
    assert f1_score("paris", "london") == 0.0
    # Unanswerable: the gold answer is "", only an empty prediction scores.
    assert f1_score("", "") == 1.0 and exact_match("", "") == 1.0
    assert f1_score("", "paris") == 0.0 and exact_match("", "paris") == 0.0
    assert f1_score("paris", "") == 0.0


def test_squad_scores_max_over_golds_no_answer_and_missing() -> None:
    examples = [
        _ex("a", "x", (("New York City", 0), ("New York", 0))),
        _ex("b", "x", (("the red car", 0),)),
        _ex("c", "x"),  # unanswerable
        _ex("d", "x"),  # unanswerable, predicted an answer
        _ex("e", "x", (("blue", 0),)),  # no prediction at all
    ]
    preds = {"a": "new york", "b": "red bus", "c": "", "d": "blue"}
    scores = squad_scores(examples, preds)
    # a: EM 1 (second gold), F1 1; b: EM 0, F1 P=1/2 R=1/2 -> 0.5; e: 0.
    # c: 1/1; d: 0/0.
    assert scores["HasAns_exact"] == pytest.approx(100 * 1 / 3)
    assert scores["HasAns_f1"] == pytest.approx(100 * 1.5 / 3)
    assert scores["NoAns_exact"] == pytest.approx(50.0)
    assert scores["NoAns_f1"] == pytest.approx(50.0)
    assert scores["exact"] == pytest.approx(100 * 2 / 5)
    assert scores["f1"] == pytest.approx(100 * 2.5 / 5)
    assert (scores["total"], scores["HasAns_total"], scores["NoAns_total"]) == (5, 3, 2)


# ----------------------------------------------------------- span mapping
def test_char_span_to_tokens_and_whitespace_trimming() -> None:
    context = "Paris is the capital of France."
    tok = WordTokenizer([context])
    _, offsets = tok.encode_with_offsets(context)
    # " the capital " starts at the space before "the": trimmed to "the capital".
    span = answer_char_span(context, " the capital ", 8)
    assert span == (9, 20)
    assert char_span_to_tokens(offsets, span) == (2, 3)
    # A span inside one word maps to that word; an off-by-two offset finds the text.
    assert char_span_to_tokens(offsets, (1, 3)) == (0, 0)
    assert answer_char_span(context, "France", 22) == (24, 30)
    assert answer_char_span(context, "Berlin", 0) is None
    assert answer_char_span(context, "   ", 0) is None


def test_context_windows_cover_all_tokens_with_overlap() -> None:
    assert context_windows(10, 4, 3) == [(0, 4), (3, 7), (6, 10)]
    assert context_windows(3, 4, 2) == [(0, 3)]
    assert context_windows(0, 4, 2) == [(0, 0)]
    # A stride wider than the window is capped so no token is skipped.
    assert context_windows(9, 3, 10) == [(0, 3), (3, 6), (6, 9)]


def test_features_answer_crossing_window_boundaries_maps_to_cls_or_exact_tokens() -> None:
    words = [f"w{i}" for i in range(30)]
    context = " ".join(words)
    answer = "w9 w10 w11"
    start = context.index(answer)
    ex = _ex("q1", context, ((answer, start),), question="which words?")
    tok = WordTokenizer([context, ex.question])
    # question has 3 tokens -> base 5, room = 16 - 5 - 1 = 10 context tokens, windows 4 apart.
    feats = SquadFeatures([ex], tok, seq_len=16, doc_stride=4, training=False)
    windows = context_windows(30, 10, 4)
    assert len(feats) == len(windows)
    whole = partial = 0
    for f, (lo, hi) in enumerate(windows):
        s, e = feats.targets[f].tolist()
        if lo <= 9 and hi > 11:
            whole += 1
            offs = feats.offsets[f]
            assert context[offs[s][0] : offs[e][1]] == answer
            assert feats.inputs[f, 0, s] == tok._index["w9"]
            assert feats.inputs[f, 1, s] == 1  # context tokens are segment 1
        else:
            assert (s, e) == (0, 0)
            partial += int(lo <= 11 and hi > 9)
    assert whole >= 1 and partial >= 1  # some window cuts the answer: it says "no answer"
    x, y = feats.get_batch(torch.arange(len(feats)))
    assert x.shape == (len(windows), 3, 16) and y.shape == (len(windows), 2)
    # [CLS] question [SEP] context [SEP], mask 1 over the real tokens.
    assert x[0, 0, 0] == tok.cls_id and x[0, 0, 4] == tok.sep_id and x[0, 0, 15] == tok.sep_id
    assert x[0, 2].sum() == 16


def test_unanswerable_and_padding() -> None:
    ex = _ex("q", "short context here", question="anything?")
    tok = WordTokenizer([ex.context, ex.question])
    feats = SquadFeatures([ex], tok, seq_len=12, doc_stride=4, training=True)
    assert feats.targets.tolist() == [[0, 0]]
    ids, types, mask = feats.inputs[0]
    assert mask.tolist() == [1] * 8 + [0] * 4
    assert ids[8:].tolist() == [tok.pad_id] * 4
    assert types.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]


def test_training_drops_unmappable_answers() -> None:
    good = _ex("g", "red green blue", (("green", 4),))
    bad = _ex("b", "red green blue", (("purple", 0),))
    tok = WordTokenizer([good.context, "q?"])
    feats = SquadFeatures([good, bad], tok, seq_len=12, doc_stride=4, training=True)
    assert feats.skipped == 1 and feats.example_index.tolist() == [0]


# ------------------------------------------------------- answer selection
def test_select_answers_best_span_over_windows_and_null_threshold() -> None:
    context = "alpha beta gamma delta epsilon"
    ex = _ex("q", context, (("gamma delta", 11),), question="what?")
    tok = WordTokenizer([context, ex.question])
    feats = SquadFeatures([ex], tok, seq_len=9, doc_stride=2, training=False)
    n, length = len(feats), 9
    assert n > 1
    start = torch.zeros(n, length)
    end = torch.zeros(n, length)
    # In the feature whose window holds "gamma delta", point start/end at it.
    f = next(i for i in range(n) if feats.targets[i].tolist() != [0, 0])
    s, e = feats.targets[f].tolist()
    start[f, s], end[f, e] = 5.0, 4.0
    assert select_answers(start, end, feats) == {"q": "gamma delta"}
    # End before start is never allowed: with the peaks swapped the best span is the
    # start peak alone (5 + 0 beats any span ending on the earlier end peak).
    start2, end2 = torch.zeros(n, length), torch.zeros(n, length)
    start2[f, e], end2[f, s] = 5.0, 4.0
    assert select_answers(start2, end2, feats) == {"q": "delta"}
    # Null score 8 vs span 9: an answer at threshold 0, "" when the threshold is -2.
    start[:, 0], end[:, 0] = 4.0, 4.0
    assert select_answers(start, end, feats, null_threshold=0.0) == {"q": "gamma delta"}
    assert select_answers(start, end, feats, null_threshold=-2.0) == {"q": ""}
    # max_answer_tokens=1 forbids the two-token span: the best single token scores 5.
    one = select_answers(start, end, feats, max_answer_tokens=1, null_threshold=10.0)
    assert one == {"q": "gamma"}
    assert select_answers(start, end, feats, max_answer_tokens=1) == {"q": ""}


# ------------------------------------------------------------------ reader
def test_read_squad_v2_file_and_errors(tmp_path: Path) -> None:
    data = {
        "version": "v2.0",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "Ann lives in Rome.",
                        "qas": [
                            {
                                "id": "1",
                                "question": "Where does Ann live?",
                                "answers": [{"text": "Rome", "answer_start": 13}],
                                "is_impossible": False,
                            },
                            {
                                "id": "2",
                                "question": "Where does Bob live?",
                                "answers": [],
                                "plausible_answers": [{"text": "Rome", "answer_start": 13}],
                                "is_impossible": True,
                            },
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    a, b = read_squad(path)
    assert (a.qid, a.answers, a.answer_starts, a.is_impossible) == ("1", ("Rome",), (13,), False)
    assert (b.answers, b.is_impossible) == ((), True)
    with pytest.raises(UserError, match=r"^SQuAD file not found: .*nope.json; set data.path"):
        read_squad(tmp_path / "nope.json")
    path.write_text(json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}), encoding="utf-8")
    with pytest.raises(UserError, match=r"missing or bad key 'context'"):
        read_squad(path)
