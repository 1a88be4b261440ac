"""Searching a sharded index: one Ray actor per shard, each holding a memory-mapped ``plaid.Searcher``.

**Fan-out.** A call to :meth:`ShardedSearcher.search` sends one message per shard (the queries
inline when they are small, else put once in Ray's object store) (all queries of the call; the shard batches them itself); every
shard runs the same four stages with the same parameters (``ncells``, threshold, ``ndocs``
resolved from ``k`` once, here) and returns its top-``k``: local ids, stage-4 scores and external
ids. Shards share one codec (checked when they open), so their stage-4 scores — MaxSim on the
decompressed vectors — are on one scale.

**Merge.** Local ids become global ids through the routing; the shards' lists are merged into
one top-``k`` by score, descending, ties broken by the smaller global id. Each shard's list
holds its own best ``k``, so the merged list is the exact top-``k`` of the union: the same as
searching each shard folder in turn in one process and merging.

**Faults.** Actors are created with ``max_restarts`` (default 1): an actor whose process (or
node) dies is restarted by Ray, which re-opens its shard, and the shard's part of the call is
retried: sent again as soon as the actor is back (every ``RETRY_PAUSE_S`` while Ray reports it
restarting). Everything is bounded by ``timeout`` seconds per call, retry included: a shard that
has not answered by then (dead for good, or hanging) is either a :class:`ShardUnavailableError`
naming it, or with ``allow_partial=True`` left out of the merge and named in
``ShardedResults.missing_shards``. A shard found down stays marked so: the next calls try it
once without waiting for a restart (and clear the mark when it answers), so a partial result
does not cost the whole timeout each time; so does every call when ``max_restarts=0``. A shard
whose files are missing or damaged is down too (its error is the reason given). Nothing waits
without a deadline.

**Subsets** (``subset=``, as for :class:`plaid.Searcher`): global (int) ids go only to their
owner shard, as local ids; external (str) ids go to every shard, each keeping the ones it holds.
An id no shard holds raises :class:`InvalidInputError` (unless a shard is missing from a partial
result: it may have held it). Each shard applies ``Searcher``'s rule to its part: a part of at
most ``max(ndocs, 4k)`` documents is scored exhaustively.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..embeddings import as_queries
from ..errors import IndexCorruptError, InvalidInputError, PlaidError
from .cluster import CONNECT_TIMEOUT_S, connect
from .errors import ShardUnavailableError
from .sharded import Routing, ShardedManifest, check_shard, read_sharded_manifest

__all__ = ["ShardedSearcher", "ShardedResults", "merge_topk", "DEFAULT_TIMEOUT_S", "START_TIMEOUT_S"]

logger = logging.getLogger(__name__)

#: Seconds one search call may take, every shard's answer and the retry included.
DEFAULT_TIMEOUT_S = 60.0
#: Seconds the shard actors may take to start and open their shards.
START_TIMEOUT_S = 120.0
#: Seconds between attempts to reach an actor that Ray is restarting.
RETRY_PAUSE_S = 0.25
#: Query batches up to this size are sent inside each shard's message rather than put once in
#: the object store (a put and a fetch cost more than copying a few kilobytes).
INLINE_QUERY_BYTES = 256 << 10


@dataclass
class ShardedResults:
    """Search results of a batch of queries over a sharded index.

    ids : int64 [nq, k] — global document ids, best first; -1 where fewer hits.
    scores : float32 [nq, k] — stage-4 MaxSim; -inf where ``ids`` is -1.
    shards : list of list of str — the shard each hit came from (None where ``ids`` is -1).
    missing_shards : list of str — shards left out of a partial result (``allow_partial``).
    """

    ids: np.ndarray
    scores: np.ndarray
    shards: List[List[Optional[str]]]
    missing_shards: List[str] = field(default_factory=list)
    names: Optional[List[List[Optional[str]]]] = None

    def doc_ids(self) -> list:
        """External ids of the hits: a list per query of str (``None`` where ``ids`` is -1)."""
        if self.names is None:
            raise InvalidInputError("this index stores no external doc_ids (build it with doc_ids=...)")
        return [list(row) for row in self.names]

    @property
    def partial(self) -> bool:
        return bool(self.missing_shards)

    def __iter__(self):
        yield self.ids
        yield self.scores

    def __len__(self) -> int:
        return len(self.ids)


def merge_topk(parts: Sequence[Tuple[np.ndarray, np.ndarray]], k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Merge per-shard results (global ids int64 [nq, k_i], scores float32 [nq, k_i]) into the
    top ``k``: by score, descending, ties by the smaller global id; entries with id -1 last.

    Returns (columns int64 [nq, k] into the concatenated parts, -1 where fewer hits; valid bool
    [nq, k]).
    """
    ids = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1).astype(np.float64)
    invalid = ids < 0
    key_score = np.where(invalid, np.inf, -scores)
    key_id = np.where(invalid, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key_id, key_score), axis=-1)[:, :k]
    valid = ~np.take_along_axis(invalid, order, axis=1)
    if order.shape[1] < k:
        pad = k - order.shape[1]
        order = np.concatenate([order, np.full((len(order), pad), -1, np.int64)], axis=1)
        valid = np.concatenate([valid, np.zeros((len(valid), pad), bool)], axis=1)
    return np.where(valid, order, -1), valid


def _set_threads(threads: int) -> None:
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def _name_hash(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest(), "little")


class _ShardServer:
    """The actor of one shard: a ``plaid.Searcher`` over ``root/name`` (memory-mapped).

    Opening problems are kept and reported by :meth:`ready` (and raised by :meth:`search`), so
    the driver can name them; a restarted actor opens the shard afresh.
    """

    def __init__(self, root: str, name: str, fingerprint: str, threads: int, options: dict):
        _set_threads(threads)
        self.root, self.name, self.path = root, name, os.path.join(root, name)
        self.fingerprint, self.options = fingerprint, dict(options)
        self.searcher = None
        self.error: Optional[PlaidError] = None
        self._names: Optional[tuple] = None
        self._delay = [0.0, 0]
        try:
            self._open()
        except PlaidError as e:
            self.error = e

    def _open(self) -> None:
        from ..indexing.indexer import TrainedParams
        from ..search.searcher import Searcher

        if not os.path.isdir(self.path):
            raise IndexCorruptError(f"{self.root}: shard {self.name} is missing (no folder {self.path})")
        try:
            fp = TrainedParams.from_index(self.path).fingerprint()
            self.searcher = Searcher(self.path, **self.options)
        except PlaidError as e:
            raise type(e)(f"{self.root}: shard {self.name}: {e}") from None
        if fp != self.fingerprint:
            raise IndexCorruptError(f"{self.root}: shard {self.name} was trained with another codec (fingerprint "
                                    f"{fp[:12]}..., the sharded index's is {self.fingerprint[:12]}...): shards must "
                                    "share one codec")

    def ready(self) -> dict:
        """Where this actor runs and what it serves, or the error that keeps it from serving."""
        import ray

        info = {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "error": self.error}
        if self.searcher is not None:
            info.update(generation=self.searcher.generation, num_documents=self.searcher.num_documents)
        return info

    def debug_delay(self, seconds: float, calls: int = 1) -> None:
        """For fault tests: the next ``calls`` searches first sleep ``seconds``."""
        self._delay = [float(seconds), int(calls)]

    def _known(self, routed: int) -> set:
        """External ids of this shard's routed documents (deleted ones too)."""
        key = (self.searcher.generation, routed)
        if self._names is None or self._names[0] != key:
            table = self.searcher.doc_ids
            self._names = (key, set(table.tolist()[:routed]) if table is not None else set())
        return self._names[1]

    def _serve(self, generation: int) -> None:
        if self.error is not None:
            raise self.error
        if self.searcher.generation < generation:
            self.searcher.reload()
        if self.searcher.generation < generation:
            raise IndexCorruptError(f"{self.root}: shard {self.name} is at generation {self.searcher.generation}, "
                                    f"behind the sharded manifest's {generation}")

    def id_hashes(self, generation: int, routed: int) -> np.ndarray:
        """Sorted uint64 hashes of the external ids of this shard's live routed documents."""
        self._serve(generation)
        table = self.searcher.doc_ids
        if table is None:
            return np.zeros(0, np.uint64)
        alive = np.ones(len(table), bool)
        alive[table.deleted[table.deleted < len(table)]] = False
        names = table.tolist()[:routed]
        return np.sort(np.array([_name_hash(n) for i, n in enumerate(names) if alive[i]], np.uint64))

    def names_of_hashes(self, hashes: Sequence[int], routed: int) -> List[str]:
        want = set(int(h) for h in hashes)
        table = self.searcher.doc_ids
        deleted = set(table.deleted.tolist())
        return [n for i, n in enumerate(table.tolist()[:routed]) if i not in deleted and _name_hash(n) in want]

    def search(self, queries, k: int, params: dict, subset, generation: int, routed: int):
        """This shard's top-``k`` of every query: (local ids int64 [nq, k], scores float32
        [nq, k], external ids per hit or None, per subset group the mask of the external ids
        this shard holds or None). Documents beyond ``routed`` (no global id yet) are left out."""
        seconds, calls = self._delay
        if calls > 0:
            self._delay[1] -= 1
            time.sleep(seconds)
        self._serve(generation)
        s = self.searcher
        queries = [np.array(q, np.float32) for q in queries]  # Ray hands over read-only views
        extra = max(0, s.num_documents - routed)
        owned = None
        sub = None
        if subset is not None:
            kind, groups = subset
            known = None
            resolved, owned = [], []
            for ints, strs in groups:
                mask = None
                if strs:
                    known = self._known(routed) if known is None else known
                    mask = np.fromiter((x in known for x in strs), bool, len(strs))
                    strs = [x for x, ok in zip(strs, mask) if ok]
                owned.append(mask)
                resolved.append(list(ints) + list(strs))
            sub = resolved[0] if kind == "all" else resolved
        kk = k + extra
        res = s.search(queries, k=kk, subset=sub, **params)
        ids, scores = res.ids, res.scores
        if extra:  # drop documents without a global id (an add that did not finish), keep the best k others
            keep = (ids >= 0) & (ids < routed)
            order = np.argsort(~keep, axis=1, kind="stable")
            ids = np.where(np.take_along_axis(keep, order, 1), np.take_along_axis(ids, order, 1), -1)
            scores = np.where(ids >= 0, np.take_along_axis(scores, order, 1), -np.inf).astype(np.float32)
        ids, scores = ids[:, :k], scores[:, :k]
        names = None
        if s.doc_ids is not None:
            table = s.doc_ids
            names = [[table[i] if i >= 0 else None for i in row] for row in ids.tolist()]
        return ids, scores, names, owned


_REMOTE_SERVER = None  # ray.remote(_ShardServer), made on first use


class ShardedSearcher:
    """Searches a sharded index with one Ray actor per shard (see the module docstring).

    Parameters
    ----------
    path : str
        The sharded index folder (built by :func:`plaid.distributed.build_sharded`). Every node
        that runs a shard actor must see it at the same path (a shared file system).
    ray_address : str, optional
        None: a local Ray started in this process (unless one is initialised already);
        ``"auto"`` or ``"host:port"``: join that cluster.
    timeout : float, default 60
        Seconds a search call may take in all (the retry of a restarted shard included).
    allow_partial : bool, default False
        A shard that does not answer in time is left out (named in ``missing_shards``) rather
        than a :class:`ShardUnavailableError`. Can be overridden per call.
    max_restarts : int, default 1
        Restarts Ray grants each shard actor.
    num_cpus_per_shard : float, optional
        CPUs each actor reserves while it lives. Default: Ray's default for actors (one free CPU to
        be placed, none held afterwards), so that new shards, and the actors of a node that died,
        always find a place.
    threads_per_shard : int, optional
        Search threads per actor (default: the cluster's CPUs divided by the shards, at least 1).
    start_timeout : float, default 120
        Seconds the actors may take to start and open their shards.
    connect_timeout : float, default 30
        Seconds a Ray address may take to answer.
    batch_size, engine, centroid_precision, load_all
        Passed to each shard's :class:`plaid.Searcher` (CPU only: shards search on the CPU).
    scheduling_strategy : str, default "SPREAD"
        Ray's placement of the actors ("SPREAD": over the nodes; "DEFAULT": packed).
    check_ids : bool, default True
        On opening, check that no external id is live in two shards (one hash per document).
    """

    def __init__(self, path, *, ray_address: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT_S,
                 allow_partial: bool = False, max_restarts: int = 1, num_cpus_per_shard: Optional[float] = None,
                 threads_per_shard: Optional[int] = None, start_timeout: float = START_TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S, batch_size: int = 32, engine: str = "auto",
                 centroid_precision: str = "auto", load_all: bool = False, scheduling_strategy: str = "SPREAD",
                 check_ids: bool = True, ray_init_options: Optional[dict] = None):
        self.path = os.fspath(getattr(path, "path", path))
        self.timeout = _positive_number("timeout", timeout)
        self.start_timeout = _positive_number("start_timeout", start_timeout)
        self.allow_partial = bool(allow_partial)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, (int, np.integer)) or max_restarts < 0:
            raise InvalidInputError(f"max_restarts must be a non-negative integer, got {max_restarts!r}")
        self.max_restarts = int(max_restarts)
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if engine not in ("auto", "numpy", "torch"):
            raise InvalidInputError(f"engine must be 'auto', 'numpy' or 'torch', got {engine!r}")
        self._options = {"batch_size": int(batch_size), "engine": engine, "centroid_precision": centroid_precision,
                         "load_all": bool(load_all), "device": "cpu"}
        self._m: ShardedManifest = read_sharded_manifest(self.path)
        for s in self._m.shards:  # clear errors before any actor starts
            check_shard(self.path, s)
        self._ray = connect(ray_address, timeout=connect_timeout, init_options=ray_init_options)
        cpus = float(self._ray.cluster_resources().get("CPU", 1.0))
        n = len(self._m.shards)
        self.threads_per_shard = int(threads_per_shard) if threads_per_shard is not None else max(1, int(cpus // n))
        if self.threads_per_shard <= 0:
            raise InvalidInputError(f"threads_per_shard must be a positive integer, got {threads_per_shard!r}")
        if num_cpus_per_shard is not None and (isinstance(num_cpus_per_shard, bool) or not isinstance(
                num_cpus_per_shard, (int, float, np.integer, np.floating)) or not num_cpus_per_shard >= 0):
            raise InvalidInputError(f"num_cpus_per_shard must be a non-negative number or None, got "
                                    f"{num_cpus_per_shard!r}")
        self.num_cpus_per_shard = None if num_cpus_per_shard is None else float(num_cpus_per_shard)
        self.scheduling_strategy = scheduling_strategy
        self._actors: List = []
        self._info: List[dict] = []
        self._down: Dict[int, str] = {}  # shards that failed their last call: shard -> why
        try:
            self._start(list(range(n)))
            if check_ids and self._m.has_doc_ids:
                self._check_unique_ids()
        except BaseException:
            self.close()
            raise

    # -- actors --------------------------------------------------------------------------------
    def _new_actor(self, i: int):
        global _REMOTE_SERVER
        ray = self._ray
        if _REMOTE_SERVER is None:  # one actor class per process: Ray exports its definition once
            _REMOTE_SERVER = ray.remote(_ShardServer)
        options = dict(max_restarts=self.max_restarts, max_task_retries=0, scheduling_strategy=self.scheduling_strategy)
        if self.num_cpus_per_shard is not None:
            options["num_cpus"] = self.num_cpus_per_shard
        cls = _REMOTE_SERVER.options(**options)
        return cls.remote(self.path, self._m.shards[i].name, self._m.codec_fingerprint, self.threads_per_shard,
                          self._options)

    def _start(self, which: List[int]) -> None:
        ray = self._ray
        while len(self._actors) < len(self._m.shards):
            self._actors.append(None)
            self._info.append({})
        for i in which:
            self._actors[i] = self._new_actor(i)
            self._down.pop(i, None)
        refs = {self._actors[i].ready.remote(): i for i in which}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=self.start_timeout)
        late = [self._m.shards[refs[r]].name for r in refs if r not in ready]
        if late:
            raise ShardUnavailableError(
                f"{self.path}: shard actor(s) {', '.join(late)} did not start within {self.start_timeout:g} s "
                f"(each needs {self.num_cpus_per_shard if self.num_cpus_per_shard is not None else 1:g} free CPU to "
                f"start; the cluster has {ray.cluster_resources().get('CPU', 0):g}, "
                f"{ray.available_resources().get('CPU', 0):g} free)", late)
        for r in ready:
            i = refs[r]
            try:
                info = ray.get(r, timeout=self.start_timeout)
            except ray.exceptions.RayError as e:
                raise ShardUnavailableError(f"{self.path}: the actor of shard {self._m.shards[i].name} failed to "
                                            f"start ({_ray_reason(e)})", [self._m.shards[i].name]) from None
            if info.get("error") is not None:
                raise info["error"]
            self._info[i] = info

    def _check_unique_ids(self) -> None:
        ray = self._ray
        routing = Routing(self._m.routing, len(self._m.shards))
        refs = [a.id_hashes.remote(s.generation, routing.routed(i))
                for i, (a, s) in enumerate(zip(self._actors, self._m.shards))]
        hashes = ray.get(refs, timeout=self.start_timeout)
        allh = np.concatenate(hashes) if hashes else np.zeros(0, np.uint64)
        u, counts = np.unique(allh, return_counts=True)
        dup = u[counts > 1]
        if not len(dup):
            return
        owners: Dict[str, List[str]] = {}
        for i, h in enumerate(hashes):
            mine = dup[np.isin(dup, h)]
            if len(mine):
                for n in ray.get(self._actors[i].names_of_hashes.remote(mine.tolist(), routing.routed(i)),
                                 timeout=self.start_timeout):
                    owners.setdefault(n, []).append(self._m.shards[i].name)
        clash = {n: s for n, s in owners.items() if len(s) > 1}
        if clash:
            n, s = next(iter(clash.items()))
            raise IndexCorruptError(f"{self.path}: the external id {n!r} is live in {' and '.join(s)}"
                                    f"{f' ({len(clash)} such ids)' if len(clash) > 1 else ''}; ids must be unique "
                                    "across shards")

    def close(self) -> None:
        """Stop the shard actors (the Ray connection stays)."""
        for a in self._actors:
            if a is not None:
                try:
                    self._ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self._actors = []

    def __enter__(self) -> "ShardedSearcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def reload(self) -> bool:
        """Follow the newest sharded manifest (new shards get actors; the others re-open their
        shard on their next call when it moved on). Also replaces actors that are dead for good.
        Returns True when the manifest changed."""
        m = read_sharded_manifest(self.path)
        changed = m.generation != self._m.generation
        if m.codec_fingerprint != self._m.codec_fingerprint or [s.name for s in m.shards[: len(self._m.shards)]] != \
                [s.name for s in self._m.shards]:
            raise IndexCorruptError(f"{self.path}: the sharded index was replaced (another codec or other shards); "
                                    "open a new ShardedSearcher")
        for s in m.shards:
            check_shard(self.path, s)
        old = len(self._m.shards)
        self._m = m
        dead = []
        for i in range(old):
            try:
                self._ray.get(self._actors[i].ready.remote(), timeout=self.timeout)
            except self._ray.exceptions.RayActorError:
                dead.append(i)
            except self._ray.exceptions.RayError:  # busy (a long call) or unreachable now: keep it
                pass
        self._start(dead + list(range(old, len(m.shards))))
        return changed

    # -- facts ---------------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self._m.generation

    @property
    def num_documents(self) -> int:
        return self._m.num_documents

    @property
    def dim(self) -> int:
        return self._m.dim

    @property
    def num_shards(self) -> int:
        return len(self._m.shards)

    @property
    def shard_names(self) -> List[str]:
        return [s.name for s in self._m.shards]

    def actor_info(self) -> List[dict]:
        """Per shard: the actor's process id, node address, generation and documents served."""
        out = []
        for i, a in enumerate(self._actors):
            try:
                info = self._ray.get(a.ready.remote(), timeout=self.timeout)
                info.pop("error", None)
            except self._ray.exceptions.RayError as e:
                info = {"error": _ray_reason(e)}
            out.append(dict(info, shard=self._m.shards[i].name))
        return out

    def actor(self, shard: str):
        """The Ray actor handle of ``shard`` (for tests and operations)."""
        return self._actors[self._m.shard_index(shard)]

    def __repr__(self) -> str:
        return (f"ShardedSearcher({self.path!r}, shards={self.num_shards}, documents={self.num_documents}, "
                f"generation={self.generation})")

    # -- search --------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, ncells: Optional[int] = None,
               centroid_score_threshold: Optional[float] = None, ndocs: Optional[int] = None, subset=None,
               timeout: Optional[float] = None, allow_partial: Optional[bool] = None) -> ShardedResults:
        """Top-``k`` documents of every query over all shards (see :meth:`plaid.Searcher.search`
        for the parameters; ids are global). ``timeout`` / ``allow_partial`` override the
        searcher's for this call."""
        ray = self._ray
        params = _params(k, ncells, centroid_score_threshold, ndocs, self._m.search_depth)
        k = int(k)
        timeout = self.timeout if timeout is None else _positive_number("timeout", timeout)
        partial_ok = self.allow_partial if allow_partial is None else bool(allow_partial)
        m = self._m
        routing = Routing(m.routing, len(m.shards))
        qs = as_queries(queries, dim=m.dim)
        specs, groups = self._route_subset(subset, len(qs), routing)
        # small batches travel inline in each shard's message; larger ones once, through the object store
        qref = ray.put(qs) if sum(q.nbytes for q in qs) > INLINE_QUERY_BYTES else qs
        targets = [i for i in range(len(m.shards)) if specs is None or specs[i] is not None]

        def submit(i):
            return self._actors[i].search.remote(qref, k, params, None if specs is None else specs[i],
                                                 m.shards[i].generation, routing.routed(i))

        refs = {submit(i): i for i in targets}
        retried, answers, failures = set(), {}, {}
        later: Dict[int, float] = {}  # shard -> when to send its part again (its actor is restarting)
        deadline = time.monotonic() + timeout
        while refs or later:
            now = time.monotonic()
            if now >= deadline:
                break
            for i in [i for i, t in later.items() if t <= now]:
                del later[i]
                refs[submit(i)] = i
            wake = min([deadline - now] + [t - now for t in later.values()])
            if not refs:
                time.sleep(max(0.0, wake))
                continue
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=max(0.0, wake))
            for r in ready:
                i = refs.pop(r)
                try:
                    answers[i] = ray.get(r, timeout=max(1.0, deadline - time.monotonic()))
                except ray.exceptions.RayTaskError as e:
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, InvalidInputError):
                        raise cause from None
                    failures[i] = f"{type(cause or e).__name__}: {_first_line(cause or e)}"
                except ray.exceptions.RayActorError as e:
                    # the actor died or is restarting: Ray restarts it (max_restarts); send this part
                    # again until it answers or the deadline passes (a read-only search may run twice,
                    # never answers twice). A shard found down by an earlier call, or whose actor may
                    # not restart, gets one immediate retry only.
                    quick = i in self._down or self.max_restarts == 0
                    if i in retried and quick:
                        failures[i] = _ray_reason(e)
                        continue
                    if i not in retried:
                        logger.warning("%s: the actor of shard %s failed (%s); retrying", self.path,
                                       m.shards[i].name, _ray_reason(e))
                    later[i] = time.monotonic() + (RETRY_PAUSE_S if i in retried else 0.0)
                    retried.add(i)
                except ray.exceptions.RayError as e:
                    failures[i] = _ray_reason(e)
        for i in list(refs.values()) + list(later):
            failures[i] = f"no answer within {timeout:g} s" + (" (after a retry)" if i in retried else "")
        for r in refs:
            try:
                ray.cancel(r)
            except Exception:  # noqa: BLE001
                pass
        for i in answers:
            self._down.pop(i, None)
        for i, why in failures.items():
            self._down[i] = why
        if failures:
            names = [m.shards[i].name for i in sorted(failures)]
            detail = "; ".join(f"{m.shards[i].name}: {failures[i]}" for i in sorted(failures))
            if not partial_ok:
                raise ShardUnavailableError(f"{self.path}: shard(s) {', '.join(names)} did not answer ({detail})",
                                            names)
            logger.warning("%s: partial result without %s (%s)", self.path, ", ".join(names), detail)
        return self._merge(answers, failures, groups, routing, len(qs), k)

    def _merge(self, answers: dict, failures: dict, groups, routing: Routing, nq: int, k: int) -> ShardedResults:
        m = self._m
        order = sorted(answers)
        if groups is not None and not failures:
            unknown = []
            for gi, (_, strs) in enumerate(groups):
                if strs:
                    held = np.zeros(len(strs), bool)
                    for i in order:
                        owned = answers[i][3]
                        if owned is not None and owned[gi] is not None:
                            held |= owned[gi]
                    unknown += [x for x, h in zip(strs, held) if not h]
            if unknown:
                raise InvalidInputError(f"subset: {len(unknown)} unknown document id(s), e.g. {unknown[:5]}")
        if not order:
            ids = np.full((nq, k), -1, np.int64)
            return ShardedResults(ids, np.full((nq, k), -np.inf, np.float32), [[None] * k for _ in range(nq)],
                                  [m.shards[i].name for i in sorted(failures)], [[None] * k for _ in range(nq)]
                                  if m.has_doc_ids else None)
        parts = [(routing.to_global(i, answers[i][0]), answers[i][1]) for i in order]
        cols, valid = merge_topk(parts, k)
        gids = np.concatenate([p[0] for p in parts], axis=1)
        scores = np.concatenate([p[1] for p in parts], axis=1)
        widths = np.cumsum([0] + [p[0].shape[1] for p in parts])
        safe = np.where(valid, cols, 0)
        ids = np.where(valid, np.take_along_axis(gids, safe, 1), -1)
        out_scores = np.where(valid, np.take_along_axis(scores, safe, 1), -np.inf).astype(np.float32)
        part_of = np.searchsorted(widths, safe, side="right") - 1
        shard_names = [[m.shards[order[p]].name if ok else None for p, ok in zip(prow, vrow)]
                       for prow, vrow in zip(part_of.tolist(), valid.tolist())]
        names = None
        if m.has_doc_ids:
            names = []
            for q in range(nq):
                row = []
                for c, p, ok in zip(safe[q].tolist(), part_of[q].tolist(), valid[q].tolist()):
                    row.append(answers[order[p]][2][q][c - widths[p]] if ok else None)
                names.append(row)
        return ShardedResults(ids, out_scores, shard_names, [m.shards[i].name for i in sorted(failures)], names)

    def _route_subset(self, subset, nq: int, routing: Routing):
        """Per shard: None (nothing of the subset there: the shard is not asked) or the message
        part ("all" | "each", [(local ids, external ids)] per group); and the parsed groups."""
        if subset is None:
            return None, None
        m = self._m
        per_query = isinstance(subset, (list, tuple)) and len(subset) > 0 and all(
            isinstance(s, (list, tuple, set, frozenset, np.ndarray)) for s in subset)
        if per_query and len(subset) != nq:
            raise InvalidInputError(f"subset: {len(subset)} subsets given for {nq} queries")
        raw_groups = list(subset) if per_query else [subset]
        groups = []
        for g in raw_groups:
            if isinstance(g, (str, bytes, int, np.integer)):
                g = [g]
            try:
                items = list(g.tolist() if isinstance(g, np.ndarray) else g)
            except TypeError:
                raise InvalidInputError(f"subset must be ids or a list of ids per query, got {type(g).__name__}") \
                    from None
            ints, strs = [], []
            for x in items:
                if isinstance(x, str):
                    strs.append(x)
                elif isinstance(x, (int, np.integer)) and not isinstance(x, bool):
                    ints.append(int(x))
                else:
                    raise InvalidInputError(f"subset: document ids must be str (external) or int (global), got {x!r}")
            ints = np.unique(np.asarray(ints, np.int64))
            bad = ints[(ints < 0) | (ints >= m.num_documents)]
            if len(bad):
                raise InvalidInputError(f"subset: {len(bad)} unknown document id(s), e.g. {bad[:5].tolist()}")
            if strs and not m.has_doc_ids:
                raise InvalidInputError("subset: this index has no external doc_ids; use global (int) ids")
            groups.append((ints, list(dict.fromkeys(strs))))
        located = [routing.locate(ints) if len(ints) else (np.zeros(0, np.int64), np.zeros(0, np.int64))
                   for ints, _ in groups]
        specs = []
        for i in range(len(m.shards)):
            bodies = [(np.sort(loc[sh == i]).tolist(), strs) for (sh, loc), (_, strs) in zip(located, groups)]
            if all(not a and not b for a, b in bodies):
                specs.append(None)
            else:
                specs.append(("each", bodies) if per_query else ("all", bodies))
        return specs, groups


def _params(k, ncells, threshold, ndocs, depth: int = 1) -> dict:
    """The search parameters every shard uses (defaults by ``k`` and the index's search depth,
    overrides checked)."""
    from ..search.searcher import default_search_params

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise InvalidInputError(f"k must be a positive integer, got {k!r}")
    params = default_search_params(int(k), depth)
    for name, v in (("ncells", ncells), ("ndocs", ndocs)):
        if v is not None:
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise InvalidInputError(f"{name} must be a positive integer, got {v!r}")
            params[name] = int(v)
    if threshold is not None:
        try:
            threshold = float(threshold)
        except (TypeError, ValueError):
            raise InvalidInputError(f"centroid_score_threshold must be a number, got {threshold!r}") from None
        if not np.isfinite(threshold):
            raise InvalidInputError("centroid_score_threshold must be a finite number")
        params["centroid_score_threshold"] = threshold
    return params


def _positive_number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v) or v <= 0:
        raise InvalidInputError(f"{name} must be a positive number of seconds, got {v!r}")
    return float(v)


def _first_line(e: BaseException) -> str:
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0][:300] if lines else type(e).__name__


def _ray_reason(e: BaseException) -> str:
    """A one-line reason for a Ray failure (the actor died, is unavailable, a timeout)."""
    return f"{type(e).__name__}: {_first_line(e)}"
