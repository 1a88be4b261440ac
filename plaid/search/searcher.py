"""The Searcher: loads an index, picks parameters, batches queries, runs the four stages."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .. import format as fmt
from ..embeddings import as_queries
from ..errors import IndexCorruptError, InvalidInputError
from ..indexing.codecs import codec_array_names, codec_from_manifest
from . import stages, stages_torch

__all__ = ["Searcher", "Results", "default_search_params"]


@dataclass
class Results:
    """Search results of a batch of queries.

    ids : int64 [nq, k] — document ids (0..N-1, input order), best first; -1 where fewer hits.
    scores : float32 [nq, k] — MaxSim on the decompressed vectors; -inf where ``ids`` is -1.
    """

    ids: np.ndarray
    scores: np.ndarray
    names: Optional[list] = None  # external ids of the index (list of str), when it has them

    def doc_ids(self) -> list:
        """External ids of the hits: a list per query of str (``None`` where ``ids`` is -1).

        Raises :class:`InvalidInputError` when the index was built without ``doc_ids``.
        """
        if self.names is None:
            raise InvalidInputError("this index stores no external doc_ids (build it with doc_ids=...)")
        return [[self.names[i] if i >= 0 else None for i in row] for row in self.ids.tolist()]

    def __iter__(self):  # allows ``ids, scores = searcher.search(...)``
        yield self.ids
        yield self.scores

    def __len__(self) -> int:
        return len(self.ids)


def _cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


def default_search_params(k: int) -> dict:
    """Default search parameters by ``k``: ncells, centroid_score_threshold, ndocs.

    k <= 10: 2 / 0.5 / 256; k <= 100: 2 / 0.45 / 1024; larger: 4 / 0.4 / max(4k, 4096).
    These are PLAID's, except ncells=2 (PLAID: 1) for k <= 10: on msmarco-5k one cell per query
    token kept 96.6% of the exact top-10 among the candidates, two cells 99.0%, for ~0.2 ms more.
    """
    if k <= 10:
        return {"ncells": 2, "centroid_score_threshold": 0.5, "ndocs": 256}
    if k <= 100:
        return {"ncells": 2, "centroid_score_threshold": 0.45, "ndocs": 1024}
    return {"ncells": 4, "centroid_score_threshold": 0.4, "ndocs": max(4 * k, 4096)}


class _Workspace(threading.local):
    """Per-thread scratch buffers reused across queries.

    Fresh multi-megabyte temporaries are page-faulted on every query; reusing buffers measured
    ~2x faster for stage 4 here (firecracker VM, 2 cores).
    """

    def get(self, name: str, shape: tuple, dtype) -> np.ndarray:
        n = int(np.prod(shape))
        buf = self.__dict__.get(name)
        if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
            buf = np.empty(max(n, 1 << 16), dtype)
            self.__dict__[name] = buf
        return buf[:n].reshape(shape)


class Searcher:
    """Searches a PLAID index with MaxSim.

    Parameters
    ----------
    path : str or plaid.Index
        The index directory.
    device : str or torch.device, default "cpu"
        Where search runs. "cuda" moves the whole index to the GPU and runs every stage there.
    load_all : bool, default False
        Load codes and residuals into memory. By default (CPU) they stay memory-mapped on disk and
        only centroids, the inverted file and document lengths are loaded. Always True on GPU.
    verify : bool, default False
        Check every file's size and CRC-32 before loading (reads the whole index once).
    batch_size : int, default 32
        Queries processed together; bounds the memory of a call.
    centroid_precision : {"auto", "float32", "bfloat16"}, default "auto"
        Precision of the query-centroid scores of stages 1-3 on CPU ("auto": bfloat16 where the CPU
        has native bfloat16 arithmetic, which halves the memory traffic of the largest product;
        float32 elsewhere). Stage 4 is always float32.
    engine : {"auto", "numpy", "torch"}, default "auto"
        Implementation of the stages: "numpy" (per query, the fastest on CPU) or "torch"
        (batched over queries; the one used on GPU). "auto" picks by device.
    """

    def __init__(self, path, *, device: Union[str, torch.device] = "cpu", load_all: bool = False,
                 verify: bool = False, batch_size: int = 32, centroid_precision: str = "auto",
                 engine: str = "auto"):
        path = getattr(path, "path", path)
        self.path = os.fspath(path)
        self.manifest = fmt.read_manifest(self.path)
        if verify:
            problems = fmt.verify_index(self.path)
            if problems:
                raise IndexCorruptError(f"{self.path}: index verification failed: " + "; ".join(problems))
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidInputError("device='cuda' was asked for but torch sees no CUDA device")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise InvalidInputError(f"batch_size must be a positive integer, got {batch_size!r}")
        if centroid_precision not in ("auto", "float32", "bfloat16"):
            raise InvalidInputError(f"centroid_precision must be 'auto', 'float32' or 'bfloat16', got {centroid_precision!r}")
        if engine not in ("auto", "numpy", "torch"):
            raise InvalidInputError(f"engine must be 'auto', 'numpy' or 'torch', got {engine!r}")
        if engine == "numpy" and self.device.type != "cpu":
            raise InvalidInputError("engine='numpy' runs on the CPU only")
        self.engine = engine if engine != "auto" else ("numpy" if self.device.type == "cpu" else "torch")
        self.batch_size = int(batch_size)
        self._ws = _Workspace()
        self._doc_ids = None
        m = self.manifest
        try:
            self.dim = int(m["dim"])
            self.num_documents = int(m["num_documents"])
            self.num_tokens = int(m["num_tokens"])
            self.num_centroids = int(m["num_centroids"])
            self.normalized = bool(m.get("normalized", False))
            codec_params = m["codec"]
            code_bytes = int(codec_params["code_bytes"])
        except (KeyError, TypeError, ValueError) as e:
            raise IndexCorruptError(f"{self.path}: manifest lacks a field ({e})") from None
        arr = lambda name, mmap=False: fmt.open_array(self.path, m, name, mmap=mmap)  # noqa: E731
        try:
            self.codec = codec_from_manifest(self.dim, codec_params,
                                             {n: arr(n) for n in codec_array_names(codec_params)})
        except (ValueError, KeyError) as e:
            raise IndexCorruptError(f"{self.path}: codec arrays are inconsistent ({e})") from None
        centroids = np.ascontiguousarray(arr("centroids"), dtype=np.float32)
        ivf = arr("ivf")
        ivf_offsets = arr("ivf_offsets").astype(np.int64)
        doclens = arr("doclens").astype(np.int64)
        doc_offsets = np.zeros(len(doclens) + 1, np.int64)
        np.cumsum(doclens, out=doc_offsets[1:])
        self._check_consistency(centroids, ivf, ivf_offsets, doclens, code_bytes)
        mmap = not load_all and self.device.type == "cpu"
        codes = arr("codes", mmap=mmap)
        residuals = arr("residuals", mmap=mmap)
        if centroid_precision == "auto":
            centroid_precision = "bfloat16" if self.device.type == "cpu" and _cpu_has_native_bf16() else "float32"
        self.centroid_precision = centroid_precision
        dev = self.device
        self._centroids_t = torch.from_numpy(centroids).to(dev)
        # Stages 1-3 score query tokens against unit centroids when the index holds unit vectors
        # (cosine, the scale PLAID's thresholds are set in); stage 4 decodes with the raw ones.
        scoring = centroids
        if self.normalized:
            scoring = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        self._centroids_scoring = torch.from_numpy(np.ascontiguousarray(scoring, np.float32)).to(dev).to(
            torch.bfloat16 if centroid_precision == "bfloat16" else torch.float32)
        if self.engine == "numpy":
            self._centroids = centroids
            self._ivf, self._ivf_offsets = ivf, ivf_offsets
            self._doc_offsets = doc_offsets
            self._codes, self._residuals = codes, residuals
        else:
            self.codec.to(dev)
            self._ivf_t = torch.from_numpy(ivf.astype(np.int64)).to(dev)
            self._ivf_offsets_t = torch.from_numpy(ivf_offsets).to(dev)
            self._doc_offsets_t = torch.from_numpy(doc_offsets).to(dev)
            self._codes_t = torch.from_numpy(codes.astype(np.int64)).to(dev)
            self._residuals_t = torch.from_numpy(np.array(residuals)).to(dev)

    def _check_consistency(self, centroids, ivf, ivf_offsets, doclens, code_bytes) -> None:
        m = self.manifest
        T = self.num_tokens
        problems = []
        if len(doclens) != self.num_documents:
            problems.append(f"doclens has {len(doclens)} entries for {self.num_documents} documents")
        elif int(doclens.sum()) != T:
            problems.append(f"doclens sum to {int(doclens.sum())}, not {T} tokens")
        if centroids.shape != (self.num_centroids, self.dim):
            problems.append(f"centroids have shape {centroids.shape}, expected {(self.num_centroids, self.dim)}")
        if len(ivf_offsets) != self.num_centroids + 1 or int(ivf_offsets[-1]) != len(ivf) \
                or (len(ivf_offsets) and int(ivf_offsets[0]) != 0) or (np.diff(ivf_offsets) < 0).any():
            problems.append("ivf_offsets do not delimit ivf")
        elif len(ivf) and (int(ivf.min()) < 0 or int(ivf.max()) >= self.num_documents):
            problems.append("ivf holds document ids out of range")
        for name, shape in (("codes", [T]), ("residuals", [T, code_bytes])):
            if m["arrays"].get(name, {}).get("shape") != shape:
                problems.append(f"{name} has shape {m['arrays'].get(name, {}).get('shape')}, expected {shape}")
        if problems:
            raise IndexCorruptError(f"{self.path}: inconsistent index: " + "; ".join(problems))

    # -- search -----------------------------------------------------------------------------------
    def search(self, queries, k: int = 10, *, ncells: Optional[int] = None,
               centroid_score_threshold: Optional[float] = None, ndocs: Optional[int] = None) -> Results:
        """Top-``k`` documents by MaxSim for each query.

        Parameters
        ----------
        queries : array [m, dim], array [nq, m, dim], or a list of [m_i, dim] arrays (numpy/torch)
        k : int, default 10
            Results per query.
        ncells : int, optional
            Centroids probed per query token (stage 1). Default by ``k``, see
            :func:`default_search_params`.
        centroid_score_threshold : float, optional
            Stage-2 pruning: only document tokens whose centroid scores at least this for some
            query token count.
        ndocs : int, optional
            Candidates kept after stage 2; stage 3 keeps ``ndocs // 4`` (at least ``k``).

        Returns
        -------
        Results with ``ids`` int64 [nq, k] and ``scores`` float32 [nq, k], best first.
        """
        params = self._params(k, ncells, centroid_score_threshold, ndocs)
        k = int(k)
        qs = as_queries(queries, dim=self.dim)
        ids = np.full((len(qs), k), -1, dtype=np.int64)
        scores = np.full((len(qs), k), -np.inf, dtype=np.float32)
        with torch.inference_mode():
            for b in range(0, len(qs), self.batch_size):
                batch = qs[b : b + self.batch_size]
                run = self._search_batch_numpy if self.engine == "numpy" else self._search_batch_torch
                for i, (bi, bs) in enumerate(run(batch, k, **params)):
                    ids[b + i, : len(bi)] = bi
                    scores[b + i, : len(bs)] = bs
        return Results(ids, scores, self.doc_ids)

    @property
    def doc_ids(self) -> Optional[list]:
        """External ids of the index (list of str, position = internal id) or None."""
        if not self.manifest.get("has_doc_ids"):
            return None
        if self._doc_ids is None:
            from ..indexing.indexer import decode_doc_ids

            self._doc_ids = decode_doc_ids(fmt.open_array(self.path, self.manifest, "doc_ids_utf8"),
                                           fmt.open_array(self.path, self.manifest, "doc_ids_offsets"))
        return self._doc_ids

    @staticmethod
    def _params(k, ncells, threshold, ndocs) -> dict:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
            raise InvalidInputError(f"k must be a positive integer, got {k!r}")
        params = default_search_params(int(k))
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

    def _centroid_scores(self, Qcat: torch.Tensor) -> torch.Tensor:
        """float32 [C, sum_m]: scores of every centroid for every query token of the batch."""
        return (self._centroids_scoring @ Qcat.to(self._centroids_scoring.dtype).T).float()

    # -- numpy engine (CPU) -------------------------------------------------------------------
    def decompress(self, pos: np.ndarray) -> np.ndarray:
        """Reconstructed vectors of the tokens at positions ``pos`` (int64 [t]) -> float32 [t, dim].

        centroid + decoded residual, renormalised to unit length when the index was built from
        unit vectors. Stage 4 scores are exact MaxSim on exactly these vectors.
        """
        pos = np.asarray(pos, dtype=np.int64)
        D = self.codec.decode_numpy(np.take(self._residuals, pos, axis=0)) if self.engine == "numpy" else \
            self.codec.decode_numpy(self._residuals_t[torch.from_numpy(pos).to(self.device)].cpu().numpy())
        centroids = self._centroids if self.engine == "numpy" else self._centroids_t.cpu().numpy()
        codes = self._codes if self.engine == "numpy" else self._codes_t.cpu().numpy()
        D += centroids.take(codes[pos], axis=0)
        if self.normalized:
            D /= np.maximum(np.sqrt(np.einsum("ij,ij->i", D, D)), 1e-12)[:, None]
        return D

    def _stage4_sims(self, pos: np.ndarray, q: np.ndarray) -> np.ndarray:
        """float32 [t, m]: decompressed tokens at ``pos`` · query tokens, in reused buffers."""
        ws = self._ws
        n = len(pos)
        R = ws.get("residuals", (n, self.codec.code_bytes), np.uint8)
        np.take(self._residuals, pos, axis=0, out=R)
        D = self.codec.decode_numpy(R, out=ws.get("D", (n, self.dim), np.float32))
        G = ws.get("G", (n, self.dim), np.float32)
        np.take(self._centroids, self._codes[pos], axis=0, out=G)
        D += G
        sims = (torch.from_numpy(D) @ torch.from_numpy(q).T).numpy()  # torch: see stages.py
        if self.normalized:
            norms = ws.get("norms", (n,), np.float32)
            np.einsum("ij,ij->i", D, D, out=norms)
            np.sqrt(norms, out=norms)
            np.maximum(norms, 1e-12, out=norms)
            sims /= norms[:, None]
        return sims

    def _search_batch_numpy(self, qs, k: int, ncells: int, centroid_score_threshold: float, ndocs: int):
        Qcat = torch.from_numpy(np.concatenate(qs))
        S_all = self._centroid_scores(Qcat).numpy()  # [C, sum_m]
        out = []
        col = 0
        for q in qs:
            m = q.shape[0]
            St = np.ascontiguousarray(S_all[:, col : col + m])
            col += m
            # stage 1: candidate generation
            docs = stages.candidates(St, ncells, self._ivf, self._ivf_offsets)
            if len(docs) == 0:
                out.append((np.zeros(0, np.int64), np.zeros(0, np.float32)))
                continue
            # stages 2-3 share one gather of the candidates' centroid scores
            vals, offs, pos, cc = stages.gather_centroid_scores(St, docs, self._doc_offsets, self._codes)
            sel = np.arange(len(docs))
            if len(docs) > ndocs:  # stage 2: pruned centroid interaction (a no-op when all are kept)
                keep = St.max(1) >= centroid_score_threshold
                sel = np.sort(stages.top_n(stages.approximate_maxsim(vals, offs, keep[cc]), ndocs))
            n3 = max(ndocs // 4, k)
            if len(sel) > n3:  # stage 3: full centroid interaction over stage 2's survivors
                if 2 * len(sel) >= len(docs):  # most survived: reduce over all, no copy
                    approx = stages.approximate_maxsim(vals, offs)[sel]
                else:
                    tok, offs3 = stages.expand_ranges(offs[sel], offs[sel + 1] - offs[sel])
                    approx = stages.approximate_maxsim(vals[tok], offs3)
                sel = np.sort(sel[stages.top_n(approx, n3)])
            docs = docs[sel]
            # stage 4: decompress and score exactly
            starts = self._doc_offsets[docs]
            pos, offs = stages.expand_ranges(starts, self._doc_offsets[docs + 1] - starts)
            sims = self._stage4_sims(pos, q)
            exact = stages.maxsim_scores(sims, offs)
            top = stages.top_n(exact, k)
            out.append((docs[top], exact[top]))
        return out

    # -- torch engine (GPU, or CPU for testing) ---------------------------------------------------
    def _take_codes_torch(self, pos: torch.Tensor) -> torch.Tensor:
        return self._codes_t[pos]

    def _decompress_torch(self, pos: torch.Tensor) -> torch.Tensor:
        D = self._centroids_t[self._codes_t[pos]] + self.codec.decode(self._residuals_t[pos])
        if self.normalized:
            D = torch.nn.functional.normalize(D, dim=1)
        return D

    def _search_batch_torch(self, qs, k: int, ncells: int, centroid_score_threshold: float, ndocs: int):
        nq, m = len(qs), max(q.shape[0] for q in qs)
        Qnp = np.zeros((nq, m, self.dim), np.float32)
        mask = np.zeros((nq, m), bool)
        for i, q in enumerate(qs):
            Qnp[i, : len(q)] = q
            mask[i, : len(q)] = True
        Q = torch.from_numpy(Qnp).to(self.device)
        qmask = torch.from_numpy(mask).to(self.device)
        # same product as the numpy engine ([C, sum_m]), so both round identically
        S2 = self._centroid_scores(torch.from_numpy(np.concatenate(qs)).to(self.device))
        S = torch.zeros((nq, m, S2.shape[0]), dtype=S2.dtype, device=self.device)
        S[qmask] = S2.T  # real tokens in (query, position) order

        pq, pd = stages_torch.candidate_pairs(S, qmask, ncells, self._ivf_t, self._ivf_offsets_t, self.num_documents)
        if pq.numel():
            table = stages_torch.prune_centroid_scores(S, qmask, centroid_score_threshold).transpose(1, 2).contiguous()
            approx = stages_torch.approximate_scores(table, pq, pd, self._doc_offsets_t, self._take_codes_torch)
            pq, pd = self._select(stages_torch.top_pairs(approx, pq, nq, max(ndocs, k)), pq, pd)
            table = S.masked_fill(~qmask.unsqueeze(2), 0.0).transpose(1, 2).contiguous()
            approx = stages_torch.approximate_scores(table, pq, pd, self._doc_offsets_t, self._take_codes_torch)
            pq, pd = self._select(stages_torch.top_pairs(approx, pq, nq, max(ndocs // 4, k)), pq, pd)
            exact = stages_torch.exact_scores(Q, pq, pd, self._doc_offsets_t, self._decompress_torch)
            keep = stages_torch.top_pairs(exact, pq, nq, k)
        else:
            exact = torch.zeros(0, device=self.device)
            keep = torch.full((nq, 0), -1, dtype=torch.long, device=self.device)
        keep = keep.cpu().numpy()
        pd_np, ex_np = pd.cpu().numpy(), exact.float().cpu().numpy()
        return [(pd_np[row[row >= 0]], ex_np[row[row >= 0]]) for row in keep]

    @staticmethod
    def _select(keep: torch.Tensor, pq: torch.Tensor, pd: torch.Tensor):
        """Flatten the valid entries of ``keep`` [nq, n] back into pairs sorted by (query, doc)."""
        sel = torch.sort(keep[keep >= 0]).values
        return pq[sel], pd[sel]

    def __repr__(self) -> str:
        return (f"Searcher({self.path!r}, documents={self.num_documents}, centroids={self.num_centroids}, "
                f"device={self.device}, engine={self.engine!r})")
