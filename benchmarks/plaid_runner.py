"""Runners of the project's own engines for ``benchmarks/run.py``: plaid and exhaustive MaxSim.

Run with the project's python; the protocol is ``benchmarks/_runner.py``'s::

    python benchmarks/plaid_runner.py {build,search} --engine plaid|exhaustive ...

plaid — config: ``plaid.Indexer`` keyword arguments (``codec``, ``pq_m``, ``nbits``, ...);
settings' params: ``ncells``, ``centroid_score_threshold``, ``ndocs`` (defaults by k otherwise).
After the timed passes it also measures, per setting, plaid's *floor*: the time of Q·Cᵀ plus
exact MaxSim over only the final candidates (stage 4 on the stage-3 survivors, which a search
with ``k = max(ndocs // 4, k)`` returns), i.e. what a perfect candidate generator would leave;
and a per-stage profile of single-query search for settings marked ``"profile": true``
(the stages' functions wrapped with timers; nothing in plaid changes).

exhaustive — exact MaxSim in torch with all document tokens preloaded as one float32 matrix
(``engine.py``'s ``FlatExhaustive``), single queries in one product each; the batch pass scores
groups of queries so that one product stays under ~1 GB. A corpus whose float32 copy would
exceed ``max_gb`` (config, default 12: 200k documents fit) is instead streamed from its float16
file by ``plaid.maxsim`` (at most 1M tokens per product, fewer for many queries: it bounds its
block to 512 MiB). There is no index: build does nothing and its size is the float16 vectors
themselves.
"""
from __future__ import annotations

import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402

from _runner import load_bundle, main  # noqa: E402


class PlaidEngine:
    name = "plaid"

    def __init__(self, config: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        import faiss

        faiss.omp_set_num_threads(threads)
        self.config = dict(config)
        self.searcher = None

    def versions(self) -> dict:
        import faiss
        import torch

        import plaid

        return {"plaid": plaid.__version__, "torch": torch.__version__, "faiss-cpu": faiss.__version__,
                "numpy": np.__version__}

    def build(self, bundle: str, index: str) -> dict:
        import plaid

        X, doclens, _ = load_bundle(bundle)
        indexer = plaid.Indexer(show_progress=False, **self.config)
        idx = indexer.build(index, plaid.Embeddings(X, doclens), overwrite=True)
        return {"num_centroids": idx.num_centroids, "bytes_per_token": idx.bytes_per_token(),
                "payload_bytes_per_token": idx.payload_bytes_per_token(),
                "timings": dict(getattr(indexer, "last_timings", {}))}

    def open(self, index: str, bundle: str) -> None:
        import plaid

        self.searcher = plaid.Searcher(index)
        self.rss_after_open_mb = current_rss_mb()

    def search(self, queries, k: int, params: dict) -> np.ndarray:
        return self.searcher.search(queries, k=k, **params).ids

    # -- floor and profile ------------------------------------------------------------------------
    def extra(self, queries, settings) -> dict:
        # first, before anything else runs: the resident set after the timed passes (every query
        # once untimed, then per setting 10 warm-up queries, the latency queries and the batch)
        out = {"floor": {}, "profile": {}, "rss_after_open_mb": self.rss_after_open_mb,
               "rss_after_queries_mb": current_rss_mb(), "rss_anon_after_queries_mb": current_rss_mb("RssAnon"),
               "rss_file_after_queries_mb": current_rss_mb("RssFile"), "memory": searcher_memory(self.searcher)}
        for st in settings:
            out["floor"][st["label"]] = self.floor(queries, int(st["k"]), dict(st.get("params", {})))
            if st.get("profile"):
                out["profile"][st["label"]] = self.profile(queries, int(st["k"]), dict(st.get("params", {})))
        return out

    def floor(self, queries, k: int, params: dict) -> dict:
        import torch

        import plaid
        from plaid.search.pipeline import top_n

        s = self.searcher
        p = dict(plaid.default_search_params(k, s.search_depth), **params)
        n3 = max(p["ndocs"] // 4, k)
        final = s.search(queries, k=n3, **p).ids  # exactly the documents stage 4 scores
        eng = s._state.engine  # the committed generation the search above used
        times, ncand, ntok = [], [], []
        with torch.inference_mode():
            for rep in range(2):  # first pass warms up
                for q, c in zip(queries, final):
                    docs = np.sort(c[c >= 0])
                    t0 = time.perf_counter()
                    R = eng.centroid_scores(q)  # Q·Cᵀ (stage 4 may take its centroid terms from it)
                    exact = eng.exact_scores(q, docs, R)
                    top_n(exact, k)
                    if rep:
                        times.append(time.perf_counter() - t0)
                        ncand.append(len(docs))
                        ntok.append(int(np.diff(s._state.snapshot.doc_offsets)[docs].sum()))
        a = np.asarray(times) * 1e3
        return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)),
                "median_candidates": float(np.median(ncand)), "median_candidate_tokens": float(np.median(ntok))}

    def profile(self, queries, k: int, params: dict) -> dict:
        """Median per-query time of each stage of single-query search (ms) and its share, from
        the pipeline's own timers (``search(..., trace=True)``)."""
        s = self.searcher
        per = []
        for q in queries[:10]:
            s.search([q], k=k, **params)
        for q in queries:
            t0 = time.perf_counter()
            res = s.search([q], k=k, trace=True, **params)
            total = time.perf_counter() - t0
            acc = dict(res.traces[0].timings)
            acc["other"] = total - sum(acc.values())
            acc["total"] = total
            per.append(acc)
        names = sorted({n for d in per for n in d})
        med = {n: float(np.median([d.get(n, 0.0) for d in per]) * 1e3) for n in names}
        mean_total = float(np.mean([d["total"] for d in per]))
        share = {n: float(np.mean([d.get(n, 0.0) for d in per]) / mean_total) for n in names if n != "total"}
        return {"median_ms": med, "share_of_mean": share}


def current_rss_mb(field: str = "VmRSS") -> float:
    """This process' resident set now, in MB (2^20 bytes): ``VmRSS`` (all), ``RssAnon`` (its own
    memory) or ``RssFile`` (touched pages of mapped files: the index's per-token arrays, libraries)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def searcher_memory(searcher) -> dict:
    """What a Searcher holds in memory, structure by structure: ``{name: bytes}`` for every array
    or tensor attribute of its engine and every array its snapshot loaded (memory-mapped arrays,
    the per-token files, are left out: they are pages of the files, counted by the RSS as they are
    touched), with the index's counts to express them per document and per token."""
    import torch

    state = searcher._state
    eng, snap = state.engine, state.snapshot
    m = snap.manifest
    seen, table = set(), {}

    def add(name, a):
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu" or a.data_ptr() in seen:
                return
            seen.add(a.data_ptr())
            table[name] = int(a.numel() * a.element_size())
        elif isinstance(a, np.ndarray) and not isinstance(a, np.memmap):
            base = a
            while isinstance(base, np.ndarray) and base.base is not None:
                base = base.base
            if not isinstance(base, np.ndarray) or isinstance(base, np.memmap) or id(base) in seen:
                return  # a view of a file mapping, or already counted
            seen.add(id(base))
            table[name] = int(base.nbytes)

    for k, v in sorted(vars(eng).items()):
        add(f"engine.{k}", v)
    for k, v in sorted(snap._cache.items()):
        add(f"snapshot.{k}", v)
        if hasattr(v, "offsets"):  # the external-id table: its offsets are loaded, its bytes mapped
            add(f"snapshot.{k}.offsets", v.offsets)
    scratch = getattr(eng, "_scratch", None)
    if scratch is not None:  # per-thread scratch of this (main) thread
        for k, v in vars(scratch).items():
            add(f"engine._scratch.{k} (per thread)", v)
    total = sum(table.values())
    pairs = int(m.arrays["ivf"].shape[0]) if "ivf" in m.arrays else 0
    return {"bytes": table, "total_bytes": total, "num_documents": m.num_documents, "num_tokens": m.num_tokens,
            "num_centroids": m.num_centroids, "ivf_pairs": pairs}


class ExhaustiveEngine:
    name = "exhaustive"
    warm_cache = False  # its vectors are read into RAM at open; a batch costs seconds per query at 200k

    def __init__(self, config: dict, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.config = dict(config)
        self.group_bytes = float(config.get("group_gb", 1.0)) * 1e9
        self.max_bytes = float(config.get("max_gb", 12.0)) * 1e9  # float32 corpus held in RAM up to this

    def versions(self) -> dict:
        import torch

        return {"torch": torch.__version__, "numpy": np.__version__}

    def build(self, bundle: str, index: str) -> dict:
        os.makedirs(index, exist_ok=True)  # nothing to build: the float16 vectors are the "index"
        return {"note": "no index; size = the float16 token vectors (256 B/token at dim 128)"}

    def open(self, index: str, bundle: str) -> None:
        import plaid
        from engine import FlatExhaustive

        X, doclens, _ = load_bundle(bundle)
        self.num_tokens = int(doclens.sum())
        self.mode = "flat" if self.num_tokens * X.shape[1] * 4 <= self.max_bytes else "chunked"
        if self.mode == "flat":
            self.ex = FlatExhaustive(X, doclens)
        else:  # too big for RAM as float32: stream the float16 file, 1M tokens per product
            self.docs = plaid.Embeddings(X, doclens)

    def search(self, queries, k: int, params: dict) -> np.ndarray:
        if self.mode == "flat":
            return self.ex.search(list(queries), k)
        import plaid
        import torch

        scores = torch.from_numpy(plaid.maxsim(list(queries), self.docs, chunk_tokens=1 << 20))
        return torch.topk(scores, k, dim=1).indices.numpy()

    def extra(self, queries, settings) -> dict:
        return {"mode": self.mode}

    def search_batch(self, queries, k: int, params: dict) -> np.ndarray:
        if self.mode != "flat":
            return self.search(queries, k, params)  # plaid.maxsim bounds its own memory
        out, group, width = [], [], 0
        cap = max(1, int(self.group_bytes / (4 * self.num_tokens)))  # query tokens per product
        for q in queries:
            if group and width + len(q) > cap:
                out.append(self.ex.search(group, k))
                group, width = [], 0
            group.append(q)
            width += len(q)
        if group:
            out.append(self.ex.search(group, k))
        return np.concatenate(out)


ENGINES = {"plaid": PlaidEngine, "exhaustive": ExhaustiveEngine}

if __name__ == "__main__":
    eng = "plaid"
    if "--engine" in sys.argv:
        i = sys.argv.index("--engine")
        eng = sys.argv[i + 1]
        del sys.argv[i : i + 2]
    main(ENGINES[eng])
