"""Extractive-QA evaluation: run a QA model over windowed features, select answers, score them.

Used by ``distml eval`` for checkpoints whose task is ``extractive_qa``: the
model gives (B, 2, T) start/end logits per feature, answers are chosen per
question with the no-answer option (:func:`~distml.data.squad_metrics.select_answers`)
and scored with the official-style SQuAD v2.0 exact match and F1.
"""

from __future__ import annotations

import torch
from torch import nn

from distml.data.squad import SquadFeatures
from distml.data.squad_metrics import select_answers, squad_scores


@torch.no_grad()
def qa_logits(
    model: nn.Module, features: SquadFeatures, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Start and end logits (N, T) of every feature, in feature order."""
    was_training = model.training
    model.eval()
    outs = []
    for lo in range(0, len(features), batch_size):
        x, _ = features.get_batch(torch.arange(lo, min(lo + batch_size, len(features))))
        outs.append(model(x.to(device)).float().cpu())
    model.train(was_training)
    logits = torch.cat(outs)
    return logits[:, 0], logits[:, 1]


def evaluate_squad(
    model: nn.Module,
    features: SquadFeatures,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    max_answer_tokens: int = 30,
    null_threshold: float = 0.0,
) -> tuple[dict[str, float], dict[str, str]]:
    """(EM/F1 scores in percent, question id -> predicted answer)."""
    start, end = qa_logits(model, features, batch_size, torch.device(device))
    predictions = select_answers(start, end, features, max_answer_tokens, null_threshold)
    return squad_scores(features.examples, predictions), predictions
