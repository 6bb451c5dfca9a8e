"""Training's name for the PyTorch classifier, which lives with the engines: the CUDA backend serves it,
and serving code does not import ``modeling/``."""

from __future__ import annotations

from stream_sentiment.engines.minilm_torch import EncoderConfig, SentimentClassifier, load_base_weights

__all__ = ["EncoderConfig", "SentimentClassifier", "load_base_weights"]
