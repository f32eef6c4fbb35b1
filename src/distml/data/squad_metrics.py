"""SQuAD v2.0 answer selection and the official-style exact-match and F1 metrics.

Metrics follow the semantics of the official v2.0 evaluation script:
answers are normalised (lower case, punctuation and the articles a/an/the
removed, whitespace collapsed); a question scores the best EM/F1 over its
gold answers; an unanswerable question has the single gold answer "" and
scores 1 only for an empty prediction; a question without a prediction
scores 0. Answer selection picks, per question, the best-scoring span
(start + end logit) over all of its windows, and answers "" when the null
score (the [CLS] position, lowest over the windows) beats it by more than a
threshold.
"""

from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence

import torch

from distml.data.squad import SquadExample, SquadFeatures

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(gold: str, pred: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(pred))


def f1_score(gold: str, pred: str) -> float:
    """Token-overlap F1 of the normalised answers; two empty answers score 1."""
    gold_toks = normalize_answer(gold).split()
    pred_toks = normalize_answer(pred).split()
    if not gold_toks or not pred_toks:
        return float(gold_toks == pred_toks)
    same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def gold_answers(example: SquadExample) -> list[str]:
    answers = [a for a in example.answers if normalize_answer(a)]
    return answers or [""]


def squad_scores(
    examples: Sequence[SquadExample], predictions: Mapping[str, str]
) -> dict[str, float]:
    """exact and f1 (percent) over all questions, and split into HasAns / NoAns."""
    sums: dict[str, list[float]] = {"": [0, 0, 0], "HasAns_": [0, 0, 0], "NoAns_": [0, 0, 0]}
    for ex in examples:
        golds = gold_answers(ex)
        em = f1 = 0.0
        if ex.qid in predictions:
            pred = predictions[ex.qid]
            em = max(exact_match(g, pred) for g in golds)
            f1 = max(f1_score(g, pred) for g in golds)
        group = "HasAns_" if golds != [""] else "NoAns_"
        for key in ("", group):
            sums[key][0] += em
            sums[key][1] += f1
            sums[key][2] += 1
    out: dict[str, float] = {}
    for prefix, (em, f1, total) in sums.items():
        if total or not prefix:
            out[f"{prefix}exact"] = 100.0 * em / max(total, 1)
            out[f"{prefix}f1"] = 100.0 * f1 / max(total, 1)
            out[f"{prefix}total"] = float(total)
    return out


def select_answers(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    features: SquadFeatures,
    max_answer_tokens: int = 30,
    null_threshold: float = 0.0,
) -> dict[str, str]:
    """Question id -> predicted answer text ("" for no answer) from per-feature logits (N, L)."""
    length = start_logits.shape[1]
    band = torch.triu(torch.ones(length, length, dtype=torch.bool))
    band &= ~torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=max_answer_tokens)
    best: dict[int, tuple[float, str]] = {}
    null: dict[int, float] = {}
    for f in range(len(features)):
        owner = int(features.example_index[f])
        s, e = start_logits[f].float(), end_logits[f].float()
        null[owner] = min(null.get(owner, float("inf")), float(s[0] + e[0]))
        offs = features.offsets[f]
        in_context = torch.tensor([o is not None for o in offs[:length]])
        allowed = band & in_context[:, None] & in_context[None, :]
        if not bool(allowed.any()):
            continue
        scores = (s[:, None] + e[None, :]).masked_fill(~allowed, float("-inf"))
        flat = int(scores.argmax())
        i, j = divmod(flat, length)
        score = float(scores[i, j])
        if owner not in best or score > best[owner][0]:
            context = features.examples[owner].context
            lo, hi = offs[i], offs[j]
            assert lo is not None and hi is not None
            best[owner] = (score, context[lo[0] : hi[1]])
    answers: dict[str, str] = {}
    for owner, null_score in null.items():
        qid = features.examples[owner].qid
        span = best.get(owner)
        if span is None or null_score - span[0] > null_threshold:
            answers[qid] = ""
        else:
            answers[qid] = span[1]
    return answers
