"""Building a sharded index: the driver trains once, Ray tasks encode the shards.

1. The driver (this process) reads a sample of the **whole** corpus and trains the centroids and
   the codec once (:meth:`plaid.Indexer.train`'s steps, same seed, same result). With token
   pooling (``pool_factor > 1``) the driver pools the whole corpus into a temporary file to train
   on the pooled vectors, and each task pools its own documents again (pooling is per document and
   deterministic, so the vectors are the same): the pooling costs twice its one-process time.
2. The corpus is cut into ``num_shards`` contiguous ranges of documents, at the document
   boundaries nearest to equal token counts. Shard ``i`` holds documents ``bounds[i] ..
   bounds[i+1]-1``; their global ids are their input positions (see :mod:`.sharded`).
3. One Ray task per shard encodes its documents into a complete plaid index folder
   ``shard-<i>`` with :meth:`plaid.Indexer.build_trained` and the driver's trained parameters.
   That is the function a one-process build runs, on the same values, so a shard built here is
   byte for byte the same as the same documents encoded in one process with the same training.
   A memory-mapped corpus (a bundle, ``np.load(..., mmap_mode="r")``) is read by each task from
   its file (which must be at the same path on every node, like the index folder); any other
   corpus goes to the tasks through Ray's object store, one shard's vectors per task.
4. When every task has finished (and reported the codec fingerprint the driver trained), the
   driver commits ``sharded.json``. A build that fails part-way (a task's error, a timeout, an
   interrupt) cancels the other tasks and removes the shard folders it created: no sharded
   manifest is written, so nothing opens (with ``overwrite``, the previous sharded index stays).
"""
from __future__ import annotations

import logging
import mmap
import os
import time
from typing import Dict, List, Optional

import numpy as np

from .._version import __version__
from ..embeddings import Embeddings, as_corpus
from ..errors import IndexExistsError, InvalidInputError, PlaidError
from ..indexing.encode import warn_empty
from ..store import LOCK_FILE, check_doc_ids, writer_lock
from .cluster import CONNECT_TIMEOUT_S, connect
from .sharded import (SHARD_NAME_RE, SHARDED_MANIFEST, ShardedIndex, ShardedManifest, ShardEntry, commit_sharded_manifest,
                      read_sharded_manifest, remove_index_folder, shard_name)

__all__ = ["build_sharded", "split_bounds"]

logger = logging.getLogger(__name__)

#: Seconds the cancelled tasks of a failed build get to stop before their folders are removed.
CANCEL_WAIT_S = 30.0


def split_bounds(doclens: np.ndarray, num_shards: int) -> np.ndarray:
    """Document boundaries int64 [num_shards + 1] (0 .. N) cutting ``doclens`` into contiguous
    ranges of about equal token counts, each of at least one document with tokens."""
    doclens = np.asarray(doclens, np.int64)
    N = len(doclens)
    if num_shards > N:
        raise InvalidInputError(f"num_shards={num_shards} exceeds the {N} documents of the corpus")
    offsets = np.concatenate([[0], np.cumsum(doclens)])
    T = int(offsets[-1])
    targets = T * np.arange(1, num_shards, dtype=np.float64) / num_shards
    cuts = np.searchsorted(offsets, targets).clip(1, N)
    nearer_prev = (targets - offsets[cuts - 1]) < (offsets[cuts] - targets)
    cuts = np.where(nearer_prev, cuts - 1, cuts)
    b = np.concatenate([[0], cuts, [N]]).astype(np.int64)
    for i in range(1, num_shards):
        b[i] = max(b[i], b[i - 1] + 1)
    for i in range(num_shards - 1, 0, -1):
        b[i] = min(b[i], b[i + 1] - 1)
    for i in range(num_shards):
        if offsets[b[i + 1]] == offsets[b[i]]:
            raise InvalidInputError(f"shard {i} would hold documents {b[i]}..{b[i + 1] - 1}, which have no tokens; "
                                    "use fewer shards")
    return b


def _direct_memmap(documents) -> Optional[tuple]:
    """(file, dtype, shape, offset) when ``documents`` is :class:`plaid.Embeddings` over a whole
    memory-mapped file (np.load(..., mmap_mode="r") or np.memmap), which a task can map itself."""
    if not isinstance(documents, Embeddings):
        return None
    v = documents.vectors
    if isinstance(v, np.memmap) and v.filename and isinstance(v.base, mmap.mmap) and v.flags.c_contiguous:
        return (os.path.abspath(v.filename), v.dtype.str, tuple(int(s) for s in v.shape), int(v.offset))
    return None


def _set_threads(threads: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def _encode_shard(root: str, name: str, lo: int, hi: int, mapped: Optional[tuple], vectors, doclens: np.ndarray,
                  doc_ids: Optional[List[str]], payload: dict, chunk_tokens: int, threads: int,
                  search_depth: int = 1) -> dict:
    """The Ray task: encode documents ``lo .. hi-1`` of the corpus into the folder ``root/name``.

    ``mapped``: (file, dtype, shape, offset, first token, end token) of a memory-mapped corpus
    to read the shard's rows from; else ``vectors`` holds them. ``payload``: the driver's
    :meth:`TrainedParams.to_payload`.
    """
    import ray

    from ..indexing.indexer import Indexer, TrainedParams

    t = time.perf_counter()
    _set_threads(threads)
    trained = TrainedParams.from_payload(payload)
    if mapped is not None:
        file, dtype, shape, offset, t_lo, t_hi = mapped
        vectors = np.memmap(file, dtype=np.dtype(dtype), mode="r", offset=offset, shape=tuple(shape))[t_lo:t_hi]
    ix = Indexer(show_progress=False, chunk_tokens=chunk_tokens, search_depth=search_depth)
    path = os.path.join(root, name)
    try:
        # overwrite: a retried task replaces what a worker that died left in its own folder
        index = ix.build_trained(path, Embeddings(vectors, doclens), trained, doc_ids=doc_ids, overwrite=True)
    except InvalidInputError as e:
        raise InvalidInputError(f"{name} (documents {lo}..{hi - 1} of the corpus; numbers below count from "
                                f"{lo}): {e}") from None
    return {"name": name, "generation": index.generation, "num_documents": index.num_documents,
            "num_tokens": index.num_tokens, "fingerprint": TrainedParams.from_index(path).fingerprint(),
            "seconds": time.perf_counter() - t, "timings": dict(ix.last_timings),
            "node": ray.util.get_node_ip_address(), "pid": os.getpid()}


def _indexer(indexer):
    from ..indexing.indexer import Indexer

    if indexer is None:
        return Indexer()
    if isinstance(indexer, dict):
        return Indexer(**indexer)
    if isinstance(indexer, Indexer):
        return indexer
    raise InvalidInputError(f"indexer must be a plaid.Indexer, a dict of its options or None, got "
                            f"{type(indexer).__name__}")


def _positive(name: str, v, number: bool = False, optional: bool = False):
    if optional and v is None:
        return None
    kinds = (int, float, np.integer, np.floating) if number else (int, np.integer)
    if isinstance(v, bool) or not isinstance(v, kinds) or not v > 0 or (number and not np.isfinite(v)):
        raise InvalidInputError(f"{name} must be a positive {'number' if number else 'integer'}"
                                f"{' or None' if optional else ''}, got {v!r}")
    return float(v) if number else int(v)


def _old_layout(root: str, overwrite: bool) -> Optional[ShardedManifest]:
    """Check that ``root`` may receive a new sharded index; returns the manifest it replaces.

    ``root`` must be absent or empty, or (``overwrite``) hold a sharded index or what a killed
    build left: the sharded manifest, its lock and temporary files, ``shard-<i>`` folders.
    """
    if os.path.lexists(root) and not os.path.isdir(root):
        raise IndexExistsError(f"{root} exists and is not a directory")
    entries = sorted(e for e in os.listdir(root) if e != LOCK_FILE) if os.path.isdir(root) else []
    if not entries:
        return None
    if not overwrite:
        raise IndexExistsError(f"{root} is not empty ({len(entries)} entries); pass overwrite=True to replace "
                               "the sharded index there")
    foreign = [e for e in entries if not (e in (SHARDED_MANIFEST, LOCK_FILE) or e.startswith(SHARDED_MANIFEST + ".")
                                          or (SHARD_NAME_RE.match(e) and os.path.isdir(os.path.join(root, e))))]
    if foreign:
        raise IndexExistsError(f"{root} holds entries that are not part of a sharded plaid index "
                               f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); refusing to "
                               "overwrite it")
    return read_sharded_manifest(root) if SHARDED_MANIFEST in entries else None


def _gather(ray, refs: Dict, timeout: Optional[float]) -> Dict[str, dict]:
    """Wait for every task (ref -> shard name); the first failure cancels the others and raises."""
    pending = dict(refs)
    out: Dict[str, dict] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
            if not ready:
                raise PlaidError(f"sharded build: {', '.join(sorted(pending.values()))} did not finish within "
                                 f"{timeout:g} s")
            for r in ready:
                name = pending.pop(r)
                try:
                    res = ray.get(r)
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, PlaidError):
                        raise cause from None
                    raise PlaidError(f"sharded build: encoding {name} failed: {type(cause or e).__name__}: "
                                     f"{str(cause or e).strip().splitlines()[-1][:300]}") from None
                except ray.exceptions.RayError as e:
                    raise PlaidError(f"sharded build: encoding {name} failed ({type(e).__name__}: "
                                     f"{str(e).strip().splitlines()[0][:300]})") from None
                out[name] = res
                logger.info("%s: %d documents, %d tokens encoded in %.1f s (node %s)", name, res["num_documents"],
                            res["num_tokens"], res["seconds"], res["node"])
    except BaseException:
        for r in pending:
            try:
                ray.cancel(r, force=True)
            except Exception:  # noqa: BLE001 - already finished or gone
                pass
        if pending:
            ray.wait(list(pending), num_returns=len(pending), timeout=CANCEL_WAIT_S)
        raise
    return out


def build_sharded(path, documents, *, num_shards: int, doc_ids=None, indexer=None, overwrite: bool = False,
                  ray_address: Optional[str] = None, max_shard_documents: Optional[int] = None,
                  cpus_per_task: float = 1.0, timeout: Optional[float] = None,
                  connect_timeout: float = CONNECT_TIMEOUT_S, ray_init_options: Optional[dict] = None) -> ShardedIndex:
    """Build a sharded index of ``documents`` at ``path``: train once here, encode the shards on Ray.

    Parameters
    ----------
    path : str
        The sharded index folder (absent or empty, or with ``overwrite`` a sharded index, which the
        new one replaces atomically: its shards are written beside the old ones, the manifest is
        switched, then the old shard folders are removed).
    documents, doc_ids
        As for :meth:`plaid.Indexer.build`. Global ids are input positions.
    num_shards : int
        Number of shards (contiguous ranges of documents of about equal token counts).
    indexer : plaid.Indexer or dict, optional
        Training parameters (codec, pq_m, seed, ...): an Indexer, or its keyword arguments.
    ray_address : str, optional
        None: a local Ray started here; ``"auto"`` or ``"host:port"``: an existing cluster
        (see :mod:`plaid.distributed.cluster`). Ray already initialised in this process is used.
    max_shard_documents : int, optional
        ``add`` starts a new shard rather than grow the smallest past this many live documents.
    cpus_per_task : float, default 1
        CPUs each encoding task reserves (its thread count: at least 1).
    timeout : float, optional
        Seconds the encoding tasks may take in all (default: no limit).
    connect_timeout : float, default 30
        Seconds a Ray address may take to answer.

    Returns the :class:`~plaid.distributed.ShardedIndex`; its ``build_timings`` holds
    ``train_s``, ``encode_s`` (the parallel phase, wall clock), ``total_s`` and each shard's task.
    """
    t_start = time.perf_counter()
    root = os.fspath(path)
    num_shards = _positive("num_shards", num_shards)
    max_shard_documents = _positive("max_shard_documents", max_shard_documents, optional=True)
    cpus_per_task = _positive("cpus_per_task", cpus_per_task, number=True)
    if timeout is not None:
        timeout = _positive("timeout", timeout, number=True)
    ix = _indexer(indexer)
    _old_layout(root, overwrite)  # a clear refusal before anything is read
    created = not os.path.exists(root)
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise PlaidError(f"{root}: cannot create the sharded index directory ({e.strerror})") from None
    new_dirs: List[str] = []
    committed = False
    try:
        with writer_lock(root):
            old = _old_layout(root, overwrite)
            corpus = as_corpus(documents)
            try:
                names = check_doc_ids(doc_ids, corpus.num_docs)
                bounds = split_bounds(corpus.doclens, num_shards)
                timings: Dict[str, float] = {}
                t = time.perf_counter()
                warn_empty(corpus)
                # the build's own training steps, on the whole corpus (pooled first, into a temporary
                # file, when the indexer pools: each task then pools its own documents the same way)
                trained = ix._train_input(corpus, timings)
                timings["train_s"] = time.perf_counter() - t
                fingerprint = trained.fingerprint()
                ray = connect(ray_address, timeout=connect_timeout, init_options=ray_init_options)
                existing = [int(SHARD_NAME_RE.match(e).group(1)) for e in os.listdir(root) if SHARD_NAME_RE.match(e)]
                first = max([old.next_shard if old else 0] + [n + 1 for n in existing])
                shard_names = [shard_name(first + i) for i in range(num_shards)]
                t = time.perf_counter()
                payload = ray.put(trained.to_payload())
                mapped = _direct_memmap(documents)
                task = ray.remote(_encode_shard).options(num_cpus=cpus_per_task, max_retries=2)
                threads = max(1, int(cpus_per_task))
                refs = {}
                for i, name in enumerate(shard_names):
                    lo, hi = int(bounds[i]), int(bounds[i + 1])
                    t_lo, t_hi = int(corpus.offsets[lo]), int(corpus.offsets[hi])
                    src = None if mapped is None else mapped + (t_lo, t_hi)
                    vectors = None if mapped is not None else ray.put(corpus.read(lo, hi))
                    new_dirs.append(os.path.join(root, name))
                    ids = names[lo:hi] if names is not None else None
                    refs[task.remote(root, name, lo, hi, src, vectors, corpus.doclens[lo:hi].copy(), ids, payload,
                                     ix.chunk_tokens, threads, ix.search_depth)] = name
                results = _gather(ray, refs, timeout)
                timings["encode_s"] = time.perf_counter() - t
            finally:
                corpus.close()
            for name in shard_names:
                if results[name]["fingerprint"] != fingerprint:
                    raise PlaidError(f"sharded build: {name} was encoded with another codec than the driver trained "
                                     "(a plaid version mismatch between the nodes?)")
            runs = tuple((int(bounds[i]), i, 0, int(bounds[i + 1] - bounds[i])) for i in range(num_shards))
            m = ShardedManifest(
                generation=old.generation + 1 if old else 0, dim=trained.dim, num_documents=int(bounds[-1]),
                has_doc_ids=names is not None, codec=dict(trained.codec.params()), normalized=trained.normalized,
                codec_fingerprint=fingerprint, max_shard_documents=max_shard_documents,
                next_shard=first + num_shards,
                shards=tuple(ShardEntry(n, results[n]["generation"], results[n]["num_documents"]) for n in shard_names),
                routing=runs, created_by=f"plaid-engine {__version__}",
                build=dict(trained.build, chunk_tokens=ix.chunk_tokens, num_shards=num_shards,
                           search_depth=ix.search_depth,
                           initial_centroids=trained.num_centroids, codec=trained.codec.name))
            commit_sharded_manifest(root, m, new=old is None)
            committed = True
            # shard folders no manifest uses any more: the replaced index's, a killed build's
            for e in sorted(os.listdir(root)):
                if SHARD_NAME_RE.match(e) and e not in shard_names:
                    remove_index_folder(os.path.join(root, e))
    except BaseException:
        if not committed:
            for d in new_dirs:
                remove_index_folder(d)
            if created:
                lock = os.path.join(root, LOCK_FILE)
                if set(os.listdir(root)) <= {LOCK_FILE}:
                    if os.path.isfile(lock) and not os.path.islink(lock):
                        os.unlink(lock)
                    try:
                        os.rmdir(root)
                    except OSError:
                        pass
        raise
    timings["total_s"] = time.perf_counter() - t_start
    out = ShardedIndex(root)
    out.build_timings = dict(timings, shards={n: results[n] for n in shard_names})
    logger.info("built %d shards of %d documents in %.1f s (train %.1f s, encode %.1f s)", num_shards,
                out.num_documents, timings["total_s"], timings["train_s"], timings["encode_s"])
    return out
