"""Text encoders: ColBERT checkpoints from a local folder -> token embeddings (optional extra).

``pip install 'plaid-engine[encode]'`` installs what they need (transformers, safetensors);
``import plaid`` never imports transformers, and neither does importing this package:
transformers is loaded when an encoder is created.

    from plaid.encoders import ColBERTEncoder
    enc = ColBERTEncoder("path/to/colbert-checkpoint", device="cpu")
    docs = enc.encode_documents(["a passage", ...])   # list of float32 [n_tokens, dim], unit rows
    qs = enc.encode_queries(["a question", ...])      # list of float32 [query_maxlen, dim]
"""
from .colbert import CheckpointError, ColBERTEncoder, detect_layout

__all__ = ["ColBERTEncoder", "CheckpointError", "detect_layout"]
