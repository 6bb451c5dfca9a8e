"""Building the sentiment model: corpora, training, export, INT8 quantization, evaluation."""
