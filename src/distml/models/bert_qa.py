"""BERT with an extractive question-answering head (start/end logits per token).

The encoder is distml's :class:`~distml.models.bert.BERT` without its MLM
head (a head that is never used would leave parameters without gradients,
which DDP rejects). The input is one (B, 3, T) tensor of token ids, token
types and attention mask (see :mod:`distml.data.squad`), or plain ids (B, T).
The output is (B, 2, T): start and end logits over the T positions, padding
pushed to -1e4. Read as "2 predictions over a vocabulary of T positions", the
language-model cross-entropy against (B, 2) targets is exactly the usual QA
loss, the mean of the start and end losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distml.models import bert
from distml.models.layers import init_transformer_weights
from distml.models.registry import register_model

PAD_LOGIT = -1e4


@dataclass
class BERTQAConfig(bert.BERTConfig):
    pass


class BERTForQA(bert.BERT):
    def __init__(self, cfg: BERTQAConfig) -> None:
        super().__init__(cfg)
        del self.head
        self.qa = nn.Linear(cfg.n_embd, 2)
        init_transformer_weights(self.qa)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if x.dim() == 3:
            ids, token_type_ids, attention_mask = x.unbind(1)
        else:
            ids = x
        logits = self.qa(self.encode(ids, attention_mask, token_type_ids)).transpose(1, 2)
        if attention_mask is not None:
            logits = logits.masked_fill((attention_mask == 0).unsqueeze(1), PAD_LOGIT)
        return logits


@register_model("bert-qa", BERTQAConfig, "extractive_qa")
def build_bert_qa(cfg: BERTQAConfig) -> BERTForQA:
    return BERTForQA(cfg)
