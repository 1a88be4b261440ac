"""Compiled CPU kernels (plaid.search.kernels_cpu) vs the numpy stages, per stage, on real queries.

For every query of each index, the numpy engine's pipeline runs with PLAID's k=10 parameters
(ncells 2 with the growth rule, threshold 0.5 with the fallback, ndocs 256: the defaults at search
depth 1; the balanced preset's depth 3 keeps 768) twice in the same
process, once with the numpy stages and once with the kernels, in alternating order (ABBA), and
each stage is timed on identical inputs (both give bit-identical results, which is checked, and
equal ``Searcher.search``'s ids and scores). Reported per stage: median ms of each and the
median over queries of the per-query ratio numpy / kernels. Stage 2 is also timed on both
sides (inverted file, documents) for both implementations, and stage 4 in three forms (numpy;
kernel on gathered copies; kernel reading the memory-mapped arrays in place).

Before timing, every page of the per-token arrays is touched once, so that neither side pays
first-touch page faults for the other (both would pay them alike in a cold process).

Then, in fresh processes: the cold compile (empty ``NUMBA_CACHE_DIR``), the warm-cache first
search (same folder again), and the numpy engine's first search for reference; and the
throughput of running queries on 1 vs 2 threads (``ThreadPoolExecutor``; the kernels release
the GIL).

Usage::

    python benchmarks/stage_kernels.py [--index NAME=PATH ...] [--reps 3] [--threads-reps 3]

Without ``--index``: msmarco-5k (built under benchmarks/_work/kernels/ if absent, ~45 s) and the
50k-document index of benchmarks/_work/store_open/index-50k when it exists
(``benchmarks/store_open.py --size 50k`` builds it). Queries: msmarco-5k's 50 real ones.
``--pad-queries 32`` lengthens the queries to ColBERT's 32 tokens (timing only). Results also go
to benchmarks/_work/kernels/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from _data import DEFAULT_DATA, load_bundle  # noqa: E402

WORK = os.path.join(HERE, "_work", "kernels")
K10 = dict(k=10, ncells=2, threshold=0.5, ndocs=256)


# -- the numpy engine's pipeline for one query, with either implementation ---------------------------
class Pipeline:
    """``Searcher._search_batch_numpy`` for one query (no subset), stage by stage, with the numpy
    stages (``impl="numpy"``) or the kernels (``impl="numba"``); records each stage's time."""

    def __init__(self, searcher):
        from plaid.search import kernels_cpu

        sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
        import reference_stages as stages  # the numpy stages as the pipeline ran them before the kernels

        self.s, self.st, self.stages, self.K = searcher, searcher._state.engine, stages, kernels_cpu
        st = self.st
        self.inplace = len(st.codes.parts) == 1
        if self.inplace:
            self.codes, self.residuals = st.codes.parts[0], st.residuals.parts[0]
            self.norms = st.norms.parts[0] if st.norms is not None else None

    def scratch(self):
        st = self.st
        return np.zeros(st.num_documents, bool), np.full(st.num_documents, -1, np.int32)

    def run(self, q, impl, times, scratch=None, stage2_side=None, stage4_form=None):
        S, st, K = self.stages, self.st, self.K
        k, ncells, threshold, ndocs = K10["k"], K10["ncells"], K10["threshold"], K10["ndocs"]
        mark, slot = scratch or self.scratch()
        t0 = time.perf_counter()
        R = self.st.centroid_scores(q)
        t1 = time.perf_counter()
        cuts = S.CellCuts(R)
        nc, target = ncells, max(ndocs, k)
        while True:
            if impl == "numpy":
                docs = S.candidates(R, nc, st.ivf, st.ivf_offsets, cuts, mark)
            else:
                docs, kth = K.candidates(R, nc, st.ivf, st.ivf_offsets, mark)
            if len(docs) >= target or nc >= st.num_centroids:
                break
            nc = min(st.num_centroids, nc + max(1, nc // 2))
        floor = (lambda: S.probed_floor(cuts, nc)) if impl == "numpy" else (lambda: float(kth.min()))
        Re = S.centroid_table(R)
        t2 = time.perf_counter()
        sel = np.arange(len(docs))
        n2, n3 = max(ndocs, k), max(ndocs // 4, k)
        ReT = None
        if len(docs) > n2:
            counts = st.dcell_offsets[docs + 1] - st.dcell_offsets[docs]
            keep = S.surviving(R, threshold)
            listed = int(st.ivf_lens[keep].sum())
            approx = None
            if listed >= n2:
                approx, covered = self._stage2(impl, keep, Re, docs, counts, listed, slot, stage2_side)
                n_covered = int(covered.sum())
            else:
                n_covered = listed
            if n_covered < n2:
                thr = S.fallback_threshold(threshold, n_covered, n2, floor())
                if thr < threshold or approx is None:
                    keep = S.surviving(R, thr)
                    approx, _ = self._stage2(impl, keep, Re, docs, counts, int(st.ivf_lens[keep].sum()), slot,
                                             stage2_side)
            sel = np.sort(S.top_n(approx, n2))
        t3 = time.perf_counter()
        if len(sel) > n3:
            if impl == "numpy":
                offs, cells = S.document_cells(docs[sel], st.dcells, st.dcell_offsets)
                approx = S.approximate_maxsim(Re, cells, offs)
            else:
                approx = K.approx_maxsim_docs(Re, None, docs[sel], st.dcells, st.dcell_offsets, ReT=ReT)
            sel = sel[np.sort(S.top_n(approx, n3))]
        t4 = time.perf_counter()
        d4 = docs[sel]
        form = stage4_form or ("numpy" if impl == "numpy" else ("inplace" if self.inplace else "gathered"))
        if form == "numpy":
            exact = self._exact_numpy(q, d4)
        elif form == "inplace":
            exact = K.exact_scores(q, st.codec, st.centroids, self.codes, self.residuals, self.norms,
                                   st.doc_offsets, d4, norm_values=st.norm_values)
        else:
            exact = self._exact_gathered(q, d4)
        top = S.top_n(exact, k)
        t5 = time.perf_counter()
        for name, dt in (("R", t1 - t0), ("stage 1", t2 - t1), ("stage 2", t3 - t2), ("stage 3", t4 - t3),
                         ("stage 4", t5 - t4), ("total", t5 - t0)):
            times.setdefault(name, []).append(dt)
        return d4[top], exact[top]

    def _stage2(self, impl, keep, Re, docs, counts, listed, slot, side):
        S, st, K = self.stages, self.st, self.K
        side = side or ("ivf" if listed <= counts.sum() else "doc")  # the searcher's rule
        if side == "ivf":
            if impl == "numpy":
                return S.pruned_maxsim(keep, Re, docs, st.ivf, st.ivf_offsets, counts, slot, return_covered=True)
            return K.approx_maxsim_ivf(Re, keep, docs, st.ivf, st.ivf_offsets, counts, slot)
        if impl == "numpy":
            offs, cells = S.document_cells(docs, st.dcells, st.dcell_offsets)
            return S.approximate_maxsim(Re, S.pruned_cells(cells, keep), offs), S.covered_documents(cells, keep, offs)
        return K.approx_maxsim_docs(Re, keep, docs, st.dcells, st.dcell_offsets, return_covered=True)

    def _exact_numpy(self, q, d4):
        S, st = self.stages, self.st
        starts = st.doc_offsets[d4]
        pos, offs = S.expand_ranges(starts, st.doc_offsets[d4 + 1] - starts)
        return S.maxsim_scores(st.token_sims(q, pos), offs)

    def _exact_gathered(self, q, d4):
        S, st, K = self.stages, self.st, self.K
        starts = st.doc_offsets[d4]
        pos, offs = S.expand_ranges(starts, st.doc_offsets[d4 + 1] - starts)
        cc = st.token_codes(pos)
        u, slot = K.used_centroids(cc, offs, np.arange(len(d4)), st.num_centroids)
        cs = (torch.from_numpy(q) @ torch.from_numpy(np.take(st.centroids, u, axis=0)).T).numpy()
        norms = st.token_norms(pos) if st.norms is not None else None
        return K.exact_maxsim(st.codec.score_table(q).numpy(), cs, slot, cc, st.residuals.take(pos), norms, offs)


def touch_pages(st) -> float:
    """Read every page of the per-token arrays once (returns seconds)."""
    t = time.perf_counter()
    for rows in (st.codes, st.residuals, st.norms):
        for a in (rows.parts if rows is not None else []):
            flat = np.asarray(a).reshape(-1).view(np.uint8)
            flat[:: 4096].sum()
    return time.perf_counter() - t


def stage2_inputs(p, q):
    """(keep, Re, docs, counts) of a query's first stage-2 pass, or None when stage 2 is skipped."""
    S, st = p.stages, p.st
    R = p.st.centroid_scores(q)
    cuts = S.CellCuts(R)
    nc = K10["ncells"]
    while True:
        docs = S.candidates(R, nc, st.ivf, st.ivf_offsets, cuts)
        if len(docs) >= 256 or nc >= st.num_centroids:
            break
        nc = min(st.num_centroids, nc + max(1, nc // 2))
    if len(docs) <= 256:
        return None
    return S.surviving(R, K10["threshold"]), S.centroid_table(R), docs, st.dcell_offsets[docs + 1] - st.dcell_offsets[docs]


def bench_index(name: str, path: str, queries, reps: int) -> dict:
    import plaid

    torch.set_num_threads(1)
    s = plaid.Searcher(path, engine="numpy")
    p = Pipeline(s)
    touched = touch_pages(p.st)
    K = p.K
    K.warmup(p.st.codes.dtype)
    want = [s.search(q, k=10) for q in queries]  # the engine itself, one query per call
    t_np, t_nb = {}, {}
    for q in queries[:2]:  # untimed warm-up of both
        p.run(q, "numpy", {}), p.run(q, "numba", {})
    for rep in range(reps):
        for i, q in enumerate(queries):
            order = ("numpy", "numba") if (i + rep) % 2 == 0 else ("numba", "numpy")
            res = {}
            for impl in order:
                res[impl] = p.run(q, impl, t_np if impl == "numpy" else t_nb)
            for impl in order:
                ids, sc = res[impl]
                assert np.array_equal(ids, want[i].ids[0][: len(ids)]) and \
                    np.array_equal(sc, want[i].scores[0][: len(sc)]), (name, i, impl)
    rows = []
    for stage in ("R", "stage 1", "stage 2", "stage 3", "stage 4", "total"):
        a, b = np.array(t_np[stage]), np.array(t_nb[stage])
        ratio = a / np.maximum(b, 1e-9)
        rows.append({"stage": stage, "numpy_ms": float(np.median(a) * 1e3), "numba_ms": float(np.median(b) * 1e3),
                     "ratio_median": float(np.median(ratio)), "ratio_of_medians": float(np.median(a) / np.median(b))})
    # stage-2 sides and stage-4 forms, on identical inputs, interleaved
    variants = {}
    st = p.st
    slot = np.full(st.num_documents, -1, np.int32)
    for rep in range(reps):
        for i, q in enumerate(queries):
            inp = stage2_inputs(p, q)
            calls = []
            if inp is not None:
                keep, Re, docs, counts = inp
                listed = int(st.ivf_lens[keep].sum())
                for impl in ("numpy", "numba"):
                    for side in ("ivf", "doc"):
                        calls.append((f"stage 2 {side} side ({impl})",
                                      lambda impl=impl, side=side: p._stage2(impl, keep, Re, docs, counts, listed, slot,
                                                                             side)))
                d4 = docs[:64]
            else:
                d4 = stages_docs(p, q)[:64]
            calls += [("stage 4 (numpy)", lambda: p._exact_numpy(q, d4)),
                      ("stage 4 kernel, gathered", lambda: p._exact_gathered(q, d4))]
            if p.inplace:
                calls.append(("stage 4 kernel, in place", lambda: K.exact_scores(
                    q, st.codec, st.centroids, p.codes, p.residuals, p.norms, st.doc_offsets, d4,
                    norm_values=st.norm_values)))
            if (i + rep) % 2:
                calls = calls[::-1]
            for label, fn in calls:
                t = time.perf_counter()
                fn()
                variants.setdefault(label, []).append(time.perf_counter() - t)
    var_rows = [{"variant": k, "ms": float(np.median(v) * 1e3), "n": len(v)} for k, v in sorted(variants.items())]
    return {"index": name, "path": path, "documents": st.num_documents, "centroids": st.num_centroids,
            "queries": len(queries), "query_tokens": int(np.median([len(q) for q in queries])), "reps": reps, "pages_touched_s": touched, "stages": rows, "variants": var_rows}


def stages_docs(p, q):
    S, st = p.stages, p.st
    R = p.st.centroid_scores(q)
    return S.candidates(R, K10["ncells"], st.ivf, st.ivf_offsets)


# -- threads ------------------------------------------------------------------------------------------
def bench_threads(path: str, queries, reps: int) -> dict:
    """Queries per second of the pipeline over all queries on 1 thread, then 2 (a pool of 2, each
    query one task, per-thread scratch), both implementations, best of ``reps``."""
    import threading

    import plaid

    torch.set_num_threads(1)
    s = plaid.Searcher(path, engine="numpy")
    p = Pipeline(s)
    touch_pages(p.st)
    p.K.warmup(p.st.codes.dtype)
    local = threading.local()

    def one(impl, q):
        if not hasattr(local, "scratch"):
            local.scratch = p.scratch()
        return p.run(q, impl, {}, local.scratch)

    out = {}
    for impl in ("numpy", "numba"):
        for q in queries[:4]:
            one(impl, q)
        best = {1: np.inf, 2: np.inf}
        for _ in range(reps):
            for workers in (1, 2):
                t = time.perf_counter()
                if workers == 1:
                    for q in queries:
                        one(impl, q)
                else:
                    with ThreadPoolExecutor(2) as ex:
                        list(ex.map(lambda q: one(impl, q), queries))
                best[workers] = min(best[workers], time.perf_counter() - t)
        out[impl] = {"qps_1": len(queries) / best[1], "qps_2": len(queries) / best[2], "speedup": best[1] / best[2]}
    # the kernels alone (inputs prepared beforehand): stage 1, stage 2 (inverted-file side),
    # stage 3 (document side), stage 4 kernel in place, per query
    st, K, S = p.st, p.K, p.stages
    prepared = []
    for q in queries:
        inp = stage2_inputs(p, q)
        if inp is None or not p.inplace:
            continue
        keep, Re, docs, counts = inp
        R = np.ascontiguousarray(Re[:, :-1])
        d4 = docs[:64]
        table = st.codec.score_table(q).numpy()
        u, sl = K.used_centroids(p.codes, st.doc_offsets, d4, st.num_centroids)
        cs = (torch.from_numpy(q) @ torch.from_numpy(np.take(st.centroids, u, axis=0)).T).numpy()
        prepared.append((R, Re, keep, docs, counts, d4, table, cs, sl))

    def kernels_only(args):
        R, Re, keep, docs, counts, d4, table, cs, sl = args
        mark, slot = local.scratch
        K.candidates(R, 2, st.ivf, st.ivf_offsets, mark)
        K.approx_maxsim_ivf(Re, keep, docs, st.ivf, st.ivf_offsets, counts, slot)
        K.approx_maxsim_docs(Re, None, docs[:256], st.dcells, st.dcell_offsets)
        K.exact_maxsim_ranges(table, cs, sl, p.codes, p.residuals, p.norms, st.doc_offsets, d4, st.norm_values)

    def task(a):
        if not hasattr(local, "scratch"):
            local.scratch = p.scratch()
        kernels_only(a)

    work = prepared * 4
    best = {1: np.inf, 2: np.inf}
    for _ in range(reps):
        for workers in (1, 2):
            t = time.perf_counter()
            if workers == 1:
                for a in work:
                    task(a)
            else:
                with ThreadPoolExecutor(2) as ex:
                    list(ex.map(task, work))
            best[workers] = min(best[workers], time.perf_counter() - t)
    out["kernels only"] = {"qps_1": len(work) / best[1], "qps_2": len(work) / best[2], "speedup": best[1] / best[2]}
    return out


# -- first search in fresh processes ---------------------------------------------------------------
CHILD = r"""
import json, os, sys, time
t0 = time.perf_counter()
import numpy as np, torch
sys.path.insert(0, {here!r})
import plaid
from plaid.search import kernels_cpu as K
from stage_kernels import Pipeline
torch.set_num_threads(1)
mode, path = sys.argv[1], sys.argv[2]
qs = json.loads(sys.argv[3])
from _data import load_bundle
_, _, queries = load_bundle({data!r})
t_import = time.perf_counter() - t0
t = time.perf_counter()
warm = K.warmup(background=True) if mode == "numba+warmup" else None
s = plaid.Searcher(path, engine="numpy")
p = Pipeline(s)
t_open = time.perf_counter() - t
impl = "numpy" if mode == "numpy" else "numba"
t = time.perf_counter()
if warm is not None:
    warm.join()
t_join = time.perf_counter() - t
firsts = []
for i in qs[:1]:
    t = time.perf_counter(); p.run(queries[i], impl, {{}}); firsts.append(time.perf_counter() - t)
steady = []
for rep in range(3):
    for i in qs[1:]:
        t = time.perf_counter(); p.run(queries[i], impl, {{}}); steady.append(time.perf_counter() - t)
print(json.dumps({{"import_s": t_import, "open_s": t_open, "join_s": t_join, "first_s": firsts[0],
                  "steady_s": float(np.median(steady)), "backend": K.backend() if impl == "numba" else "numpy"}}))
"""


def fresh_process(mode: str, path: str, cache_dir: str, qids) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, NUMBA_CACHE_DIR=cache_dir, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PLAID_NO_NUMBA", None)
    code = CHILD.format(here=HERE, data=DEFAULT_DATA)
    r = subprocess.run([sys.executable, "-c", code, mode, path, json.dumps(qids)], env=env, capture_output=True,
                       text=True, cwd="/")
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


PRIME = r"""
import json, sys, time
from plaid.search import kernels_cpu as K
t = time.perf_counter(); K.backend(); t_backend = time.perf_counter() - t
t = time.perf_counter(); K.warmup(); t_warmup = time.perf_counter() - t
print(json.dumps({"backend_s": t_backend, "warmup_s": t_warmup}))
"""


def prime(cache_dir: str) -> dict:
    """A fresh process that resolves the backend and runs warmup() (compiling or loading every
    kernel the searcher uses): (seconds of each)."""
    env = dict(os.environ, PYTHONPATH=REPO, NUMBA_CACHE_DIR=cache_dir)
    env.pop("PLAID_NO_NUMBA", None)
    r = subprocess.run([sys.executable, "-c", PRIME], env=env, capture_output=True, text=True, cwd="/")
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_first_search(path: str, rounds: int) -> dict:
    """Fresh processes, ``rounds`` times (medians): the first search with an empty numba cache
    (cold: compiles), with a warm cache, with a warm cache and ``warmup(background=True)`` started
    before the Searcher opens, and the numpy engine's first search for reference; plus
    ``backend()`` and ``warmup()`` alone (cold and warm). The same 6 queries in every process."""
    qids = [3, 10, 17, 24, 31, 38]
    res = {"cold": [], "warm": [], "warm+warmup": [], "numpy": []}
    primes = {"cold": [], "warm": []}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory(prefix="plaid-numba-cache-") as cache:
            res["cold"].append(fresh_process("numba", path, cache, qids))
        with tempfile.TemporaryDirectory(prefix="plaid-numba-cache-") as cache:
            primes["cold"].append(prime(cache))  # compiles every kernel (uint16 codes)
            primes["warm"].append(prime(cache))
            res["warm"].append(fresh_process("numba", path, cache, qids))
            res["warm+warmup"].append(fresh_process("numba+warmup", path, cache, qids))
            res["numpy"].append(fresh_process("numpy", path, cache, qids))
    out = {}
    for key, runs in res.items():
        out[key] = {f: float(np.median([r[f] for r in runs])) for f in ("import_s", "open_s", "join_s", "first_s",
                                                                         "steady_s")}
        out[key]["backend"] = runs[0]["backend"]
    for key in ("cold", "warm", "warm+warmup"):
        # time to the first result beyond the numpy engine's (fresh processes both)
        a, b = out[key], out["numpy"]
        out[key]["extra_first_search_s"] = (a["open_s"] + a["join_s"] + a["first_s"]) - (b["open_s"] + b["first_s"])
    for key, runs in primes.items():
        out["prime " + key] = {f: float(np.median([r[f] for r in runs])) for f in ("backend_s", "warmup_s")}
    return out


# -- driver ---------------------------------------------------------------------------------------------
def build_msmarco(path: str) -> str:
    import plaid

    if not os.path.exists(os.path.join(path, "manifest.json")):
        X, doclens, _ = load_bundle(DEFAULT_DATA)
        t = time.perf_counter()
        plaid.Indexer(show_progress=False).build(path, plaid.Embeddings(X, doclens))
        print(f"built {path} in {time.perf_counter() - t:.0f} s", flush=True)
    return path


def pad_queries(queries, length: int, noise: float = 0.03, seed: int = 0):
    """Each query cycled to ``length`` tokens, the repeats jittered and renormalised."""
    rng = np.random.default_rng(seed)
    out = []
    for q in queries:
        reps = q[np.arange(length) % len(q)].copy()
        extra = np.arange(length) >= len(q)
        reps[extra] += rng.normal(0, noise, (int(extra.sum()), q.shape[1])).astype(np.float32)
        reps /= np.linalg.norm(reps, axis=1, keepdims=True)
        out.append(np.ascontiguousarray(reps, np.float32))
    return out


def print_table(r: dict) -> None:
    print(f"\n== {r['index']}: {r['documents']} documents, {r['centroids']} centroids, {r['queries']} queries "
          f"({r['query_tokens']} tokens, median) x "
          f"{r['reps']} (ABBA), default k=10 parameters; bit-identical results checked ==")
    print(f"{'stage':<10}{'numpy ms':>10}{'kernels ms':>12}{'ratio (median/query)':>23}{'ratio of medians':>18}")
    for row in r["stages"]:
        print(f"{row['stage']:<10}{row['numpy_ms']:>10.3f}{row['numba_ms']:>12.3f}{row['ratio_median']:>23.2f}"
              f"{row['ratio_of_medians']:>18.2f}")
    print(f"{'variant (same inputs, interleaved)':<40}{'median ms':>10}")
    for row in r["variants"]:
        print(f"{row['variant']:<40}{row['ms']:>10.3f}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--index", action="append", default=[], help="NAME=PATH of an index to measure (repeatable)")
    ap.add_argument("--reps", type=int, default=3, help="passes over the queries per index")
    ap.add_argument("--threads-reps", type=int, default=3)
    ap.add_argument("--first-rounds", type=int, default=2, help="fresh-process rounds for the first-search figures")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: stages,threads,first")
    ap.add_argument("--pad-queries", type=int, default=0,
                    help="lengthen every query to this many tokens (its own tokens cycled, jittered by 0.03 per "
                         "dimension and renormalised: ColBERT's 32-token queries, for timing only)")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    os.makedirs(WORK, exist_ok=True)
    indexes = [(n, os.path.abspath(p)) for n, p in (s.split("=", 1) for s in args.index)]
    if not indexes:
        indexes = [("msmarco-5k", build_msmarco(os.path.join(WORK, "msmarco-5k-pq32")))]
        big = os.path.join(HERE, "_work", "store_open", "index-50k")
        if os.path.exists(os.path.join(big, "manifest.json")):
            indexes.append(("span-50k", big))
    _, _, queries = load_bundle(DEFAULT_DATA)
    if args.pad_queries:
        queries = pad_queries(queries, args.pad_queries)
    from plaid.search import kernels_cpu

    out = {"backend": kernels_cpu.backend(), "indexes": [], "threads": {}, "first_search": {}}
    for name, path in indexes:
        if "stages" not in skip:
            r = bench_index(name, path, queries, args.reps)
            out["indexes"].append(r)
            print_table(r)
        if "threads" not in skip:
            t = bench_threads(path, queries, args.threads_reps)
            out["threads"][name] = t
            print(f"\n-- {name}: threads (whole pipeline, {len(queries)} queries, best of {args.threads_reps})")
            for impl, v in t.items():
                print(f"{impl:<13} 1 thread {v['qps_1']:8.1f} q/s   2 threads {v['qps_2']:8.1f} q/s   "
                      f"speedup {v['speedup']:.2f}x")
        if "first" not in skip:
            f = bench_first_search(path, args.first_rounds)
            out["first_search"][name] = f
            print(f"\n-- {name}: first search in a fresh process (median of {args.first_rounds})")
            print(f"{'':<13}{'open s':>8}{'wait s':>8}{'1st query s':>13}{'steady ms':>11}{'extra vs numpy s':>18}")
            for key, v in f.items():
                if key.startswith("prime"):
                    continue
                extra = v.get("extra_first_search_s")
                print(f"{key:<13}{v['open_s']:>8.3f}{v['join_s']:>8.3f}{v['first_s']:>13.3f}{v['steady_s'] * 1e3:>11.2f}"
                      f"{'' if extra is None else format(extra, '18.3f')}")
            for key in ("prime cold", "prime warm"):
                v = f[key]
                print(f"{key[6:]} cache: backend() {v['backend_s']:.3f} s, then warmup() {v['warmup_s']:.3f} s")
    with open(os.path.join(WORK, "results.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    return out


if __name__ == "__main__":
    main()
