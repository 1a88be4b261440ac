"""Helpers shared by the living-index tests (not a test module)."""
from __future__ import annotations

import os
import shutil
import sys
from typing import List, Sequence, Tuple

import numpy as np

from plaid import store

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from _data import load_bundle, recall_at  # noqa: E402,F401


def doc_offsets(path: str, manifest: dict) -> np.ndarray:
    """int64 [N + 1] token offsets of the documents of the committed ``manifest``."""
    from plaid.store.files import read_npy

    doclens = read_npy(path, manifest["arrays"]["doclens"]["file"], [np.int32]).astype(np.int64)
    return np.concatenate([[0], np.cumsum(doclens)])


def decompressed_docs(searcher, docs: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
    """Decompressed vectors of ``docs`` (ascending internal ids) -> (float32 [t, d], offsets int64 [n + 1])."""
    offs = doc_offsets(searcher.path, searcher.manifest)
    docs = np.asarray(docs, np.int64)
    lens = offs[docs + 1] - offs[docs]
    pos = np.concatenate([np.arange(offs[d], offs[d + 1]) for d in docs]).astype(np.int64) if len(docs) else \
        np.zeros(0, np.int64)
    return searcher.decompress(pos), np.concatenate([[0], np.cumsum(lens)])


def flat_maxsim(queries: Sequence[np.ndarray], X: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Naive exhaustive MaxSim in float32 numpy: [nq, n] (empty documents score -inf).

    X: float32 [t, d], all documents' tokens; document j is rows offsets[j]:offsets[j + 1].
    """
    X = np.asarray(X, np.float32)
    n = len(offsets) - 1
    lens = np.diff(offsets)
    nonempty = lens > 0
    out = np.full((len(queries), n), -np.inf, np.float32)
    for i, q in enumerate(queries):
        sims = X @ np.asarray(q, np.float32).T  # [t, m]
        if nonempty.any():
            out[i, nonempty] = np.maximum.reduceat(sims, offsets[:-1][nonempty], axis=0).sum(1)
    return out


def top_k(scores: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """(indices, values) of the k best of each row, best first."""
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(scores, idx, 1)


def assert_exact_topk(res_ids: np.ndarray, res_scores: np.ndarray, cand: np.ndarray, exact: np.ndarray,
                      k: int, atol: float = 1e-4) -> None:
    """Search results equal the exhaustive top-k over candidates ``cand`` (ids) scored ``exact`` [nq, len(cand)].

    Scores must match rank by rank; ids must match except where exact scores tie (within atol):
    every returned id must be a candidate whose exact score equals the returned score.
    """
    want_idx, want_scores = top_k(exact, k)
    kk = min(k, exact.shape[1])
    for qi in range(len(res_ids)):
        got = res_ids[qi, :kk]
        assert (got >= 0).all(), f"query {qi}: fewer than {kk} results: {res_ids[qi]}"
        np.testing.assert_allclose(res_scores[qi, :kk], want_scores[qi, :kk], atol=atol, rtol=0,
                                   err_msg=f"query {qi}: scores differ from the exhaustive top-{k}")
        where = {int(c): j for j, c in enumerate(cand)}
        for r, d in enumerate(got):
            assert int(d) in where, f"query {qi}: returned id {d} is outside the candidates"
            assert abs(exact[qi, where[int(d)]] - res_scores[qi, r]) <= atol, \
                f"query {qi}: id {d} returned with score {res_scores[qi, r]}, exact {exact[qi, where[int(d)]]}"
        n_clear = int((want_scores[qi, :kk] > want_scores[qi, kk - 1] + atol).sum())
        assert set(got[:n_clear].tolist()) == set(cand[want_idx[qi, :n_clear]].tolist()), \
            f"query {qi}: ids differ from the exhaustive top-{k}"


def copy_index(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def unreferenced_files(path: str) -> List[str]:
    """plaid-owned files in ``path`` that the committed manifest does not reference."""
    m = store.read_manifest(path)
    keep = {e.file for e in m.arrays.values()} | {store.MANIFEST, store.LOCK_FILE, store.JOURNAL}
    return sorted(f for f in os.listdir(path) if f not in keep)
