"""From files to an index and to a run: the steps behind ``plaid index`` and ``plaid search``.

These functions are what the command line (``plaid/cli.py``) and ``scripts/build_index.py`` call;
they are usable from Python as well. They check every input before any long step starts (an
existing output is refused before the corpus is encoded, not after), and raise
:class:`plaid.PlaidError` subclasses only. Progress notes go to the ``plaid.pipeline`` logger
(level INFO), and to the optional ``log`` callback.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Callable, Dict, Optional

from .bundle import BundleWriter, load_bundle, load_query_bundle
from .errors import IndexExistsError, InvalidInputError
from .evaluation import load_corpus, load_queries

__all__ = ["check_output_dir", "check_output_file", "check_device", "build_index", "search"]

Log = Callable[[str], None]

logger = logging.getLogger(__name__)


def _quiet(_msg: str) -> None:
    pass


def _notes(log: Log) -> Log:
    """A note goes to this module's logger and to ``log``."""
    def note(msg: str) -> None:
        logger.info("%s", msg)
        log(msg)
    return note


def check_device(device: str) -> None:
    """Refuse a ``device`` string torch does not parse (``cpu``, ``cuda``, ``cuda:1``, ``mps``...)."""
    import torch

    if not isinstance(device, str) or not device:
        raise InvalidInputError(f"device must be a torch device name such as 'cpu' or 'cuda', got {device!r}")
    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidInputError(f"unknown device {device!r} (expected a torch device such as cpu, cuda, cuda:1 "
                                "or mps)") from None


def check_output_dir(path: str, overwrite: bool, what: str) -> None:
    """Refuse a non-empty directory (or a file) at ``path`` unless ``overwrite``."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise IndexExistsError(f"{what} {path} exists and is not a directory")
        if os.listdir(path) and not overwrite:
            raise IndexExistsError(f"{what} {path} exists and is not empty; pass --overwrite to replace it")


def check_output_file(path: str, overwrite: bool, what: str = "output") -> None:
    """Refuse an existing file at ``path`` unless ``overwrite``; refuse a directory always."""
    if os.path.isdir(path):
        raise InvalidInputError(f"{what} {path} is a directory")
    if os.path.exists(path) and not overwrite:
        raise IndexExistsError(f"{what} {path} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InvalidInputError(f"{what} {path}: directory {parent} does not exist")


def _encoder(checkpoint: str, device: str, batch_size: int, query_maxlen=None, doc_maxlen=None):
    from .encoders import ColBERTEncoder  # lazy: needs the [encode] extra

    enc = ColBERTEncoder(checkpoint, device=device, batch_size=batch_size,
                         query_maxlen=query_maxlen, doc_maxlen=doc_maxlen)
    # queries are [MASK]-padded to query_maxlen tokens: more than the model's positions cannot run
    positions = getattr(getattr(getattr(enc, "model", None), "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and query_maxlen is not None and query_maxlen > positions:
        raise InvalidInputError(f"--query-maxlen {query_maxlen} exceeds the {positions} positions of the "
                                f"checkpoint's transformer ({checkpoint})")
    return enc


def build_index(index_dir: str, *, embeddings: Optional[str] = None, corpus: Optional[str] = None,
                checkpoint: Optional[str] = None, save_embeddings: Optional[str] = None,
                overwrite: bool = False, device: str = "cpu", batch_size: int = 32,
                doc_maxlen: Optional[int] = None, indexer_options: Optional[dict] = None,
                show_progress: bool = True, log: Log = _quiet, shards: Optional[int] = None,
                ray_address: Optional[str] = None, max_shard_documents: Optional[int] = None):
    """Build an index at ``index_dir`` from an embeddings bundle or from a BEIR corpus + checkpoint.

    ``embeddings``: bundle folder (``doc_embeddings.f16.npy``, ``doclens.npy``, ``doc_ids.txt``),
    read memory-mapped. ``corpus`` + ``checkpoint``: ``corpus.jsonl`` encoded with the ColBERT
    checkpoint in batches (``save_embeddings``: also write the embeddings there as a bundle).
    ``indexer_options``: keyword arguments of :class:`plaid.Indexer`. ``device`` (the encoder's)
    must be a name torch parses, also with ``embeddings`` (where it is not used).

    ``shards``: build a sharded index of that many shards on Ray (:func:`plaid.build_sharded`;
    ``ray_address``: None for a local Ray, ``"auto"`` or ``"host:port"`` for a cluster;
    ``max_shard_documents``: where ``add`` opens a new shard).

    Returns ``(plaid.Index or plaid.ShardedIndex, timings)`` with timings in seconds
    (``encode_s``, ``index_s``).
    """
    from .indexing.indexer import Indexer

    log = _notes(log)
    if shards is not None and (isinstance(shards, bool) or not isinstance(shards, int) or shards <= 0):
        raise InvalidInputError(f"--shards must be a positive integer, got {shards!r}")
    if shards is None and (ray_address is not None or max_shard_documents is not None):
        raise InvalidInputError("--ray-address and --max-shard-documents apply to a sharded build (--shards N) only")

    if (embeddings is None) == (corpus is None):
        raise InvalidInputError("give either an embeddings bundle or a corpus (with a checkpoint), not both")
    if corpus is not None and checkpoint is None:
        raise InvalidInputError("indexing a text corpus needs a ColBERT checkpoint folder (--checkpoint)")
    if embeddings is not None and (checkpoint is not None or save_embeddings is not None):
        raise InvalidInputError("--checkpoint and --save-embeddings apply to --corpus only")
    check_output_dir(index_dir, overwrite, "index directory")
    if save_embeddings is not None:
        check_output_dir(save_embeddings, overwrite, "embeddings folder")
        if os.path.abspath(save_embeddings) == os.path.abspath(index_dir):
            raise InvalidInputError("--save-embeddings must be another folder than the index")
    check_device(device)
    indexer = Indexer(show_progress=show_progress, **(indexer_options or {}))
    timings: Dict[str, float] = {}
    writer = None
    try:
        if embeddings is not None:
            emb, ids = load_bundle(embeddings, "doc")
            if ids is None:
                warnings.warn(f"{embeddings} has no doc_ids.txt: documents are named by their position (0, 1, ...)")
                ids = [str(i) for i in range(len(emb))]
            log(f"bundle {embeddings}: {len(emb)} documents, {emb.num_tokens} tokens, dim {emb.dim}")
        else:
            ids, texts = load_corpus(corpus)
            t = time.perf_counter()
            enc = _encoder(checkpoint, device, batch_size, doc_maxlen=doc_maxlen)
            log(f"checkpoint {checkpoint}: {enc.layout} layout, dim {enc.dim}, doc_maxlen {enc.doc_maxlen}")
            parent = os.path.dirname(os.path.abspath(index_dir))  # spill beside the index, not in /tmp
            os.makedirs(parent, exist_ok=True)
            writer = BundleWriter(save_embeddings, "doc", spill_dir=parent)
            for did, vectors in zip(ids, enc.iter_documents(texts, show_progress=show_progress)):
                writer.append(did, vectors)
            timings["encode_s"] = time.perf_counter() - t
            if save_embeddings is not None:
                writer.close()
                emb, _ = load_bundle(save_embeddings, "doc")
                log(f"embeddings written to {save_embeddings}")
            else:
                emb = writer.embeddings()
            log(f"encoded {len(texts)} documents into {emb.num_tokens} tokens in {timings['encode_s']:.1f}s")
        t = time.perf_counter()
        if shards is not None:
            from .distributed.build import build_sharded

            index = build_sharded(index_dir, emb, num_shards=shards, doc_ids=ids, indexer=indexer, overwrite=overwrite,
                                  ray_address=ray_address, max_shard_documents=max_shard_documents)
        else:
            index = indexer.build(index_dir, emb, doc_ids=ids, overwrite=overwrite)
        timings["index_s"] = time.perf_counter() - t
        return index, timings
    finally:
        if writer is not None:
            writer.discard()


def search(index_dir: str, *, queries: Optional[str] = None, checkpoint: Optional[str] = None,
           query_embeddings: Optional[str] = None, k: int = 10, ncells: Optional[int] = None,
           centroid_score_threshold: Optional[float] = None, ndocs: Optional[int] = None,
           device: str = "cpu", batch_size: int = 32, query_maxlen: Optional[int] = None,
           show_progress: bool = True, log: Log = _quiet, ray_address: Optional[str] = None,
           allow_partial: bool = False):
    """Search every query of a file against the index (a plaid index, or a sharded one: then on
    Ray, ``ray_address`` as for :func:`build_index`; ``allow_partial``: shards that do not answer
    are left out, with a warning naming them, rather than an error).

    ``queries`` (BEIR ``queries.jsonl`` or ``qid<TAB>text``) + ``checkpoint``, or
    ``query_embeddings`` (a bundle folder with ``query_embeddings.f16.npy``, ``query_lens.npy``,
    ``query_ids.txt``).

    Returns ``(query_ids, doc_ids, scores, timings)``: ``doc_ids[i]`` the external ids of query
    ``i``'s hits best first (None where fewer than k), ``scores`` float32 [nq, k'] where ``k'`` is
    ``k`` capped to the index's number of documents (no query can have more hits: the run is the
    same, and a huge ``k`` does not allocate [nq, k] arrays).
    """
    from .distributed.sharded import ShardedIndex, is_sharded
    from .indexing.index import Index
    from .search.searcher import Searcher

    log = _notes(log)
    sharded = is_sharded(index_dir)
    if not sharded and (ray_address is not None or allow_partial):
        raise InvalidInputError(f"--ray-address and --allow-partial apply to a sharded index; {index_dir} is not one")

    if (queries is None) == (query_embeddings is None):
        raise InvalidInputError("give either --queries (with --checkpoint) or --query-embeddings")
    if queries is not None and checkpoint is None:
        raise InvalidInputError("encoding text queries needs a ColBERT checkpoint folder (--checkpoint)")
    if query_embeddings is not None and checkpoint is not None:
        raise InvalidInputError("--checkpoint applies to --queries only")
    check_device(device)
    if sharded and device != "cpu":
        raise InvalidInputError(f"--device {device}: a sharded index is searched by CPU shard actors (use --device cpu)")
    index = ShardedIndex(index_dir) if sharded else Index(index_dir)
    if isinstance(k, int) and not isinstance(k, bool) and k > index.num_documents:
        k = max(1, index.num_documents)
    timings: Dict[str, float] = {}
    if query_embeddings is not None:
        qs, qids = load_query_bundle(query_embeddings)
    else:
        qids, texts = load_queries(queries)
        t = time.perf_counter()
        enc = _encoder(checkpoint, device, batch_size, query_maxlen=query_maxlen)
        if enc.dim != index.dim:
            raise InvalidInputError(f"the checkpoint encodes {enc.dim}-d vectors but the index holds {index.dim}-d ones")
        qs = enc.encode_queries(texts, show_progress=show_progress)
        timings["encode_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if sharded:
        from .distributed.searcher import ShardedSearcher

        searcher = ShardedSearcher(index_dir, ray_address=ray_address, allow_partial=allow_partial)
    else:
        searcher = Searcher(index, device=device)
    timings["load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    try:
        res = searcher.search(qs, k=k, ncells=ncells, centroid_score_threshold=centroid_score_threshold, ndocs=ndocs)
    finally:
        if sharded:
            searcher.close()
    timings["search_s"] = time.perf_counter() - t
    if sharded:
        if res.missing_shards:
            warnings.warn(f"partial result: shard(s) {', '.join(res.missing_shards)} did not answer; the run "
                          "holds the other shards' documents only")
    has_names = index.has_doc_ids if sharded else searcher.doc_ids is not None
    if not has_names:
        warnings.warn(f"{index_dir} stores no document ids: the run names documents by position")
        doc_ids = [[str(i) if i >= 0 else None for i in row] for row in res.ids.tolist()]
    else:
        doc_ids = res.doc_ids()
    log(f"searched {len(qs)} queries (k={k}) in {timings['search_s']:.2f}s "
        f"({1000 * timings['search_s'] / len(qs):.1f} ms/query)")
    return qids, doc_ids, res.scores, timings
