"""ColBERT text encoder: a local checkpoint folder -> L2-normalised token embeddings.

Two folder layouts are read, both from local files only (no hub download is ever attempted):

Stanford ColBERT (``colbert-ai``, e.g. colbertv2.0)
    ``config.json`` of a BERT-family model, tokenizer files, and one state dict
    (``model.safetensors`` preferred, else ``pytorch_model.bin`` loaded with ``weights_only=True``)
    holding the encoder's weights (usually under ``bert.``) and the projection ``linear.weight``
    ``[dim, hidden]`` (no bias). ``artifact.metadata`` (JSON, optional) gives ``query_maxlen``
    (32), ``doc_maxlen`` (220), ``query_token_id`` (``[unused0]``), ``doc_token_id``
    (``[unused1]``), ``attend_to_mask_tokens`` (false) and ``mask_punctuation`` (true).

PyLate / sentence-transformers ColBERT
    ``modules.json`` listing a ``Transformer`` module then one or more ``Dense`` projections
    (``pylate.models.Dense`` or sentence-transformers' ``Dense``) in subfolders
    (``1_Dense/config.json`` + ``model.safetensors`` or ``pytorch_model.bin``);
    ``config_sentence_transformers.json`` gives ``query_prefix`` (``[Q] ``), ``document_prefix``
    (``[D] ``), ``query_length`` (32), ``document_length`` (180), ``do_query_expansion`` (true),
    ``attend_to_expansion_tokens`` (false) and ``skiplist_words`` (punctuation).

Encoding (the same in both layouts, as colbert-ai and PyLate do it):

* the marker token ([Q] for queries, [D] for documents) is inserted after ``[CLS]``;
* queries are padded with ``[MASK]`` to ``query_maxlen`` tokens (query augmentation); every one
  of those positions is kept as a query vector; the padding positions are attended to by the
  encoder only when the checkpoint says so (``attend_to_mask_tokens``; colbert-ai's default is
  not to: the [MASK] tokens attend to the query, the query does not attend to them);
* documents are truncated to ``doc_maxlen`` tokens (marker included); padding and punctuation
  tokens (the skiplist) are dropped from the output;
* rows are projected to the ColBERT dimension and L2-normalised.
"""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import InvalidInputError

__all__ = ["ColBERTEncoder", "CheckpointError", "detect_layout"]


class CheckpointError(InvalidInputError):
    """The checkpoint folder is missing, incomplete or not a ColBERT model."""


_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "sentencepiece.bpe.model", "vocab.json")
_ACTIVATIONS = {
    "Identity": lambda x: x,
    "Tanh": torch.tanh,
    "ReLU": torch.relu,
    "GELU": torch.nn.functional.gelu,
    "Sigmoid": torch.sigmoid,
}


def _offline_env() -> None:
    """Make sure nothing below tries the network (set before transformers is imported)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _transformers():
    _offline_env()
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            "text encoding needs transformers: pip install 'plaid-engine[encode]'"
        ) from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars: plaid shows its own
    return transformers


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} {path} cannot be read ({e})") from None


def detect_layout(path: str) -> str:
    """``"pylate"`` (a ``modules.json`` folder) or ``"stanford"``; raises :class:`CheckpointError`."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder not found: {path} (only local folders are read, "
                              "nothing is downloaded)")
    if os.path.exists(os.path.join(path, "modules.json")):
        return "pylate"
    if os.path.exists(os.path.join(path, "config.json")):
        return "stanford"
    raise CheckpointError(f"{path} is not a ColBERT checkpoint: it has neither modules.json "
                          "(PyLate / sentence-transformers) nor config.json (Stanford ColBERT)")


def _weights_file(folder: str, what: str) -> str:
    for name in _WEIGHT_FILES:
        p = os.path.join(folder, name)
        if os.path.exists(p):
            return p
    raise CheckpointError(f"{what} {folder} has no weights ({' or '.join(_WEIGHT_FILES[::2])})")


def _load_tensors(path: str, names: Optional[Sequence[str]] = None) -> dict:
    """Tensors of a weights file (safetensors, or a torch pickle read with weights_only=True).

    ``names``: only these (those present). Sharded checkpoints (``*.index.json``) are followed.
    """
    if path.endswith(".index.json"):
        index = _read_json(path, "weights index")
        wmap = index.get("weight_map", {})
        files = sorted({f for k, f in wmap.items() if names is None or k in names})
        out = {}
        for f in files:
            out.update(_load_tensors(os.path.join(os.path.dirname(path), f), names))
        return out
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as f:
                keys = [k for k in f.keys() if names is None or k in names]
                return {k: f.get_tensor(k) for k in keys}
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, never code
    except ImportError:
        raise CheckpointError("reading .safetensors needs safetensors: pip install 'plaid-engine[encode]'") from None
    except Exception as e:  # truncated or foreign files
        raise CheckpointError(f"weights file {path} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {path} does not hold a state dict")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return {k: v for k, v in state.items() if names is None or k in names}


@dataclass
class _Projection:
    weight: torch.Tensor  # [out, in]
    bias: Optional[torch.Tensor]
    activation: str = "Identity"
    residual: Optional[torch.Tensor] = None  # [out, in] when use_residual and in != out
    use_residual: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = _ACTIVATIONS[self.activation](torch.nn.functional.linear(x, self.weight, self.bias))
        if self.use_residual:
            y = y + (x if self.residual is None else torch.nn.functional.linear(x, self.residual))
        return y

    def to(self, device) -> "_Projection":
        mv = lambda t: None if t is None else t.to(device=device, dtype=torch.float32)  # noqa: E731
        return _Projection(mv(self.weight), mv(self.bias), self.activation, mv(self.residual), self.use_residual)


@dataclass
class _Spec:
    layout: str
    model_dir: str
    projections: List[_Projection]
    query_marker: Optional[str]
    doc_marker: Optional[str]
    query_maxlen: int
    doc_maxlen: int
    attend_to_mask: bool
    query_expansion: bool
    skiplist_words: List[str] = field(default_factory=lambda: list(string.punctuation))
    lowercase: bool = False


def _stanford_spec(path: str) -> _Spec:
    meta = {}
    meta_path = os.path.join(path, "artifact.metadata")
    if os.path.exists(meta_path):
        meta = _read_json(meta_path, "ColBERT metadata")
    weights = _weights_file(path, "checkpoint folder")
    linear = _load_tensors(weights, ["linear.weight"]).get("linear.weight")
    if linear is None:
        raise CheckpointError(f"{path}: the weights hold no 'linear.weight' projection: not a Stanford ColBERT "
                              "checkpoint (a PyLate one has a modules.json)")
    return _Spec(
        layout="stanford",
        model_dir=path,
        projections=[_Projection(linear.float(), None)],
        query_marker=meta.get("query_token_id", "[unused0]"),
        doc_marker=meta.get("doc_token_id", "[unused1]"),
        query_maxlen=int(meta.get("query_maxlen", 32)),
        doc_maxlen=int(meta.get("doc_maxlen", 220)),
        attend_to_mask=bool(meta.get("attend_to_mask_tokens", False)),
        query_expansion=True,
        skiplist_words=list(string.punctuation) if meta.get("mask_punctuation", True) else [],
    )


def _activation_name(value) -> str:
    if value is None:
        return "Identity"
    name = str(value).rsplit(".", 1)[-1]
    if name not in _ACTIVATIONS:
        raise CheckpointError(f"unsupported Dense activation {value!r} (supported: {', '.join(_ACTIVATIONS)})")
    return name


def _dense(folder: str) -> _Projection:
    cfg = _read_json(os.path.join(folder, "config.json"), "Dense config") \
        if os.path.exists(os.path.join(folder, "config.json")) else {}
    t = _load_tensors(_weights_file(folder, "Dense folder"))
    if "linear.weight" not in t:
        raise CheckpointError(f"Dense weights in {folder} hold no 'linear.weight'")
    w = t["linear.weight"].float()
    if "in_features" in cfg and "out_features" in cfg and tuple(w.shape) != (cfg["out_features"], cfg["in_features"]):
        raise CheckpointError(f"{folder}: linear.weight has shape {tuple(w.shape)}, config says "
                              f"[{cfg['out_features']}, {cfg['in_features']}]")
    b = t.get("linear.bias")
    use_residual = bool(cfg.get("use_residual", False))
    residual = t.get("residual.weight")
    if use_residual and w.shape[0] != w.shape[1] and residual is None:
        raise CheckpointError(f"{folder}: use_residual is set but 'residual.weight' is missing")
    return _Projection(w, None if b is None else b.float(), _activation_name(cfg.get("activation_function")),
                       None if residual is None else residual.float(), use_residual)


def _pylate_spec(path: str) -> _Spec:
    modules = _read_json(os.path.join(path, "modules.json"), "modules.json")
    if not isinstance(modules, list) or not modules:
        raise CheckpointError(f"{path}/modules.json lists no modules")
    modules = sorted(modules, key=lambda m: int(m.get("idx", 0)))
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    if kinds[0] != "Transformer":
        raise CheckpointError(f"{path}: the first module is {modules[0].get('type')!r}, expected a Transformer")
    projections = []
    for m, kind in zip(modules[1:], kinds[1:]):
        folder = os.path.join(path, m.get("path", ""))
        if kind == "Dense":
            projections.append(_dense(folder))
        elif kind == "Normalize":
            continue  # rows are normalised anyway
        elif kind == "Pooling":
            raise CheckpointError(f"{path} is a single-vector sentence-transformers model (it pools token vectors "
                                  "into one): not a ColBERT model")
        else:
            raise CheckpointError(f"{path}: unsupported module {m.get('type')!r} in modules.json")
    if not projections:
        raise CheckpointError(f"{path}: modules.json lists no Dense projection: not a ColBERT model")
    model_dir = os.path.join(path, modules[0].get("path", ""))
    cfg_path = os.path.join(path, "config_sentence_transformers.json")
    cfg = _read_json(cfg_path, "config") if os.path.exists(cfg_path) else {}
    st_path = os.path.join(model_dir, "sentence_bert_config.json")
    st = _read_json(st_path, "config") if os.path.exists(st_path) else {}
    expansion = bool(cfg.get("do_query_expansion", True))
    qp = cfg.get("query_prefix", "[Q] ")
    dp = cfg.get("document_prefix", "[D] ")
    return _Spec(
        layout="pylate",
        model_dir=model_dir,
        projections=projections,
        query_marker=qp or None,
        doc_marker=dp or None,
        query_maxlen=int(cfg.get("query_length", 32)),
        doc_maxlen=int(cfg.get("document_length", 180)),
        attend_to_mask=bool(cfg.get("attend_to_expansion_tokens", False)) and expansion,
        query_expansion=expansion,
        skiplist_words=list(cfg.get("skiplist_words", list(string.punctuation))),
        lowercase=bool(st.get("do_lower_case", False)),
    )


class ColBERTEncoder:
    """Encodes texts into ColBERT token embeddings with a checkpoint from a local folder.

    Parameters
    ----------
    path : str
        The checkpoint folder (Stanford ColBERT or PyLate layout, see the module docstring).
        Nothing is ever downloaded: a missing or incomplete folder raises :class:`CheckpointError`
        (a :class:`plaid.InvalidInputError`).
    device : str, default "cpu"
        torch device to run the model on.
    query_maxlen, doc_maxlen : int, optional
        Override the checkpoint's lengths (tokens, markers included).
    batch_size : int, default 32
        Texts per forward pass.

    Attributes: ``dim`` (output dimension), ``layout`` ("stanford" or "pylate"), ``query_maxlen``,
    ``doc_maxlen``.
    """

    def __init__(self, path: str, *, device: str = "cpu", query_maxlen: Optional[int] = None,
                 doc_maxlen: Optional[int] = None, batch_size: int = 32):
        path = os.fspath(path)
        layout = detect_layout(path)
        spec = _stanford_spec(path) if layout == "stanford" else _pylate_spec(path)
        for name, v in (("query_maxlen", query_maxlen), ("doc_maxlen", doc_maxlen), ("batch_size", batch_size)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "batch_size" else 4)):
                raise InvalidInputError(f"{name} must be an integer >= {1 if name == 'batch_size' else 4}, got {v!r}")
        self.path, self.layout, self._spec = path, layout, spec
        self.query_maxlen = query_maxlen or spec.query_maxlen
        self.doc_maxlen = doc_maxlen or spec.doc_maxlen
        self.batch_size = int(batch_size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError("device 'cuda' was asked for but torch sees no CUDA device")
        self._load_model(spec)

    # -- loading -----------------------------------------------------------------------------
    def _load_model(self, spec: _Spec) -> None:
        tf = _transformers()
        d = spec.model_dir
        if not os.path.exists(os.path.join(d, "config.json")):
            raise CheckpointError(f"{d} has no config.json (the transformer's configuration)")
        if not any(os.path.exists(os.path.join(d, n)) for n in _TOKENIZER_FILES):
            raise CheckpointError(f"{d} has no tokenizer files ({', '.join(_TOKENIZER_FILES[:2])}, ...)")
        _weights_file(d, "checkpoint folder")
        try:
            config = tf.AutoConfig.from_pretrained(d, local_files_only=True)
            self.tokenizer = tf.AutoTokenizer.from_pretrained(d, local_files_only=True)
            model, info = tf.AutoModel.from_pretrained(d, config=config, local_files_only=True,
                                                       output_loading_info=True)
        except CheckpointError:
            raise
        except (OSError, ValueError, KeyError, EnvironmentError) as e:
            raise CheckpointError(f"cannot load the model in {d}: {str(e).splitlines()[0]}") from None
        missing = [k for k in info.get("missing_keys", []) if not k.startswith("pooler.") and "position_ids" not in k]
        if missing:
            raise CheckpointError(f"{d}: the weights lack {len(missing)} tensor(s) of the model "
                                  f"(e.g. {', '.join(sorted(missing)[:3])}): incomplete checkpoint")
        self.model = model.float().to(self.device).eval()
        hidden = int(getattr(config, "hidden_size", spec.projections[0].weight.shape[1]))
        if spec.projections[0].weight.shape[1] != hidden:
            raise CheckpointError(f"{self.path}: the projection expects {spec.projections[0].weight.shape[1]}-d "
                                  f"inputs, the model outputs {hidden}-d")
        self._projections = [p.to(self.device) for p in spec.projections]
        self.dim = int(spec.projections[-1].weight.shape[0])
        tok = self.tokenizer
        tok.padding_side = "right"
        if tok.mask_token_id is None and spec.query_expansion:
            raise CheckpointError(f"{d}: the tokenizer has no mask token for query augmentation")
        if tok.pad_token_id is None:
            tok.pad_token = tok.mask_token
        self._query_marker_id = self._token_id(spec.query_marker)
        self._doc_marker_id = self._token_id(spec.doc_marker)
        skip = set()
        for w in spec.skiplist_words:
            ids = tok.encode(w, add_special_tokens=False) if spec.layout == "stanford" else \
                [tok.convert_tokens_to_ids(w)]
            if ids and ids[0] is not None and ids[0] != tok.unk_token_id:
                skip.add(int(ids[0]))
        self._skiplist = torch.tensor(sorted(skip), dtype=torch.long)

    def _token_id(self, token: Optional[str]) -> Optional[int]:
        if token is None:
            return None
        tid = self.tokenizer.convert_tokens_to_ids(token)
        if tid is None or (tid == self.tokenizer.unk_token_id and token != self.tokenizer.unk_token):
            raise CheckpointError(f"{self.path}: marker token {token!r} is not in the tokenizer's vocabulary")
        return int(tid)

    # -- encoding ----------------------------------------------------------------------------
    def _tokenize(self, texts: List[str], is_query: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask (int64 [b, L]) with the marker after [CLS]."""
        spec = self._spec
        if spec.lowercase:
            texts = [t.lower() for t in texts]
        maxlen = self.query_maxlen if is_query else self.doc_maxlen
        marker = self._query_marker_id if is_query else self._doc_marker_id
        expand = is_query and spec.query_expansion
        enc = self.tokenizer(list(texts), padding="max_length" if expand else "longest", truncation=True,
                             max_length=maxlen - (marker is not None), return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if marker is not None:
            col = torch.full((ids.shape[0], 1), marker, dtype=ids.dtype)
            ids = torch.cat([ids[:, :1], col, ids[:, 1:]], dim=1)
            mask = torch.cat([mask[:, :1], torch.ones_like(col), mask[:, 1:]], dim=1)
        if expand:
            ids = ids.masked_fill(mask == 0, self.tokenizer.mask_token_id)
            if spec.attend_to_mask:
                mask = torch.ones_like(mask)
        return ids, mask

    @torch.inference_mode()
    def _encode_batch(self, texts: List[str], is_query: bool) -> List[np.ndarray]:
        ids, mask = self._tokenize(texts, is_query)
        h = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state
        for p in self._projections:
            h = p(h)
        h = torch.nn.functional.normalize(h.float(), p=2, dim=-1).cpu()
        if is_query:
            keep = torch.ones_like(mask, dtype=torch.bool) if self._spec.query_expansion else mask.bool()
        else:
            keep = mask.bool() & ~torch.isin(ids, self._skiplist)
        return [h[i][keep[i]].numpy() for i in range(len(texts))]

    def _iter(self, texts: Sequence[str], is_query: bool, batch_size: Optional[int],
              show_progress: bool) -> Iterator[np.ndarray]:
        from tqdm.auto import tqdm

        bs = int(batch_size or self.batch_size)
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InvalidInputError(f"text {i} is a {type(t).__name__}, expected str")
        window = bs * 16  # sort by length inside windows: less padding, output stays in input order
        bar = tqdm(total=len(texts), unit="doc" if not is_query else "query", disable=not show_progress,
                   desc=f"plaid: encoding {'queries' if is_query else 'documents'}")
        try:
            for w in range(0, len(texts), window):
                part = texts[w : w + window]
                order = sorted(range(len(part)), key=lambda j: len(part[j]))
                out: List[Optional[np.ndarray]] = [None] * len(part)
                for b in range(0, len(order), bs):
                    sel = order[b : b + bs]
                    for j, e in zip(sel, self._encode_batch([part[j] for j in sel], is_query)):
                        out[j] = e
                    bar.update(len(sel))
                yield from out
        finally:
            bar.close()

    def iter_documents(self, texts: Sequence[str], batch_size: Optional[int] = None,
                       show_progress: bool = False) -> Iterator[np.ndarray]:
        """Yield each document's float32 ``[n_tokens, dim]`` unit-norm embeddings, in input order."""
        return self._iter(texts, False, batch_size, show_progress)

    def encode_documents(self, texts: Sequence[str], batch_size: Optional[int] = None,
                         show_progress: bool = False) -> List[np.ndarray]:
        """float32 ``[n_tokens, dim]`` per document (padding and punctuation dropped), unit rows."""
        return list(self._iter(texts, False, batch_size, show_progress))

    def encode_queries(self, texts: Sequence[str], batch_size: Optional[int] = None,
                       show_progress: bool = False) -> List[np.ndarray]:
        """float32 ``[query_maxlen, dim]`` per query ([MASK]-augmented), unit rows."""
        return list(self._iter(texts, True, batch_size, show_progress))

    def __repr__(self) -> str:
        return (f"ColBERTEncoder({self.path!r}, layout={self.layout}, dim={self.dim}, "
                f"query_maxlen={self.query_maxlen}, doc_maxlen={self.doc_maxlen}, device={self.device})")
