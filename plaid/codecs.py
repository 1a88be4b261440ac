"""Residual codecs: compress ``token - centroid`` residuals into a few bytes per token.

Two codecs share one small interface (:class:`ResidualCodec`):

* :class:`PQCodec` — residual product quantisation (faiss ``ProductQuantizer``): the residual,
  optionally rotated onto its principal axes, is split into ``m`` sub-vectors (of unequal widths
  when rotated: more bits where the variance is), each replaced by the id of the nearest of 256
  learned sub-centroids: ``m`` bytes per token. The default: more fidelity per byte than scalar
  buckets.
* :class:`ScalarCodec` — ColBERTv2's buckets: every dimension of the residual is quantised to
  ``nbits`` bits with cutoffs and weights taken from quantiles of the training residuals:
  ``dim * nbits / 8`` bytes per token.

Both are *byte-decomposable*: byte ``j`` of a code decodes on its own into one contiguous block
of the (rotated) residual's dimensions. So a query's dot products with every possible byte at
every position fit one small table (:meth:`ResidualCodec.score_table`, ``[code_bytes * 256, m]``;
the query tokens are rotated the same way first), and a token's residual score is the sum of
``code_bytes`` entries of it: asymmetric distance computation, which search uses instead of
decoding.

Beside them: :class:`NormQuantizer` (the one-byte token norms of a renormalising index) and
:func:`quantize_centroids` (int8 centroid rows with a scale each), the other two things format 3
compresses.

Training and encoding use numpy/faiss (indexing side); decoding uses torch so that search can
run it on any device.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Optional, Sequence, Tuple

import faiss
import numpy as np
import torch

from . import _loading
from .errors import InvalidInputError

__all__ = ["ResidualCodec", "PQCodec", "ScalarCodec", "make_codec", "codec_from_manifest", "check_codec_params",
           "codec_array_specs", "NormQuantizer", "NORM_LEVELS", "quantize_centroids", "dequantize_centroids"]

#: Lowest rate (bits per dimension) :func:`allocate_widths` gives a low-variance dimension, so
#: that no sub-vector grows without bound.
MIN_RATE = 0.5
#: Stored token norms are one byte: an index into a table of this many values.
NORM_LEVELS = 256
#: Of the 256 norm levels, this many span the training sample's decoded norms evenly (log scale)...
NORM_CORE_LEVELS = 192
#: ...and this many on each side reach out to NORM_TAIL_FACTOR times beyond them, in growing steps:
#: tokens added later may decode to norms the sample never had (new centroids for shifted data).
NORM_TAIL_LEVELS = 32
NORM_TAIL_FACTOR = 4.0
#: A norm table's core never spans less than this ratio max/min (a degenerate sample, e.g. one token).
NORM_MIN_SPAN = 1.01


class ResidualCodec:
    """Interface of a residual codec.

    Attributes: ``name`` (str, stored in the manifest), ``dim`` (int), ``code_bytes`` (int,
    bytes per token).
    """

    name = "abstract"
    dim: int
    code_bytes: int
    _sub_np: np.ndarray | None = None  # sub_tables() as float32, cached by score_table

    def train(self, residuals: np.ndarray, seed: int = 0) -> None:
        """Learn the codec's parameters from float32 residuals ``[n, dim]``."""
        raise NotImplementedError

    def encode(self, residuals: np.ndarray) -> np.ndarray:
        """float32 ``[n, dim]`` -> uint8 codes ``[n, code_bytes]``."""
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes ``[n, code_bytes]`` (torch, any device) -> float32 residuals ``[n, dim]``."""
        raise NotImplementedError

    def decode_numpy(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """uint8 codes ``[n, code_bytes]`` -> float32 residuals ``[n, dim]`` (CPU search path);
        written into ``out`` (float32 [n, dim], C-contiguous) when given."""
        raise NotImplementedError

    def sub_tables(self) -> np.ndarray:
        """float32 ``[code_bytes, 256, dim // code_bytes]``: what each byte value decodes to at each
        byte position (the residual is the concatenation over positions)."""
        raise NotImplementedError

    def score_table(self, q: np.ndarray, out: Optional[np.ndarray] = None) -> torch.Tensor:
        """Dot products of query tokens with every decodable byte, for scoring without decoding.

        q: float32 ``[m, dim]``. Returns float32 ``[code_bytes * 256, m]`` (CPU) whose row
        ``j * 256 + b`` holds ``<q_i, part j of a residual whose byte j is b>``; the residual score
        of a token with codes ``c`` is ``sum_j table[j * 256 + c[j]]``. out: a C-contiguous float32
        array of ``code_bytes * 256 * m`` elements to write the table into (the same values).
        """
        q = np.asarray(q, np.float32)
        if out is None:
            out = np.empty(self.code_bytes * 256 * len(q), np.float32)
        elif not out.flags.c_contiguous or out.dtype != np.float32 or out.size != self.code_bytes * 256 * len(q):
            raise ValueError(f"score_table: out must be a C-contiguous float32 array of {self.code_bytes * 256 * len(q)}"
                             " elements")
        m = len(q)
        w = -(-m // 8) * 8
        if w == m:
            self.score_tables(q, np.array([m]), out.reshape(-1))
        else:  # computed as the search's padded tables are (the same product shape, so the same
            # bits: numpy sends a one-column product to gemv, whose sums round unlike gemm's)
            full = np.empty(self.code_bytes * 256 * w, np.float32)
            self.score_tables(np.concatenate([q, np.zeros((w - m, q.shape[1]), np.float32)]), np.array([w]), full)
            out.reshape(self.code_bytes * 256, m)[...] = full.reshape(self.code_bytes * 256, w)[:, :m]
        return torch.from_numpy(out.reshape(self.code_bytes * 256, m))

    def score_tables(self, Q: np.ndarray, lens: np.ndarray, out: np.ndarray) -> None:
        """:meth:`score_table` of several queries at once (the same values: a query's table does
        not depend on the others), one after another in ``out``.

        Q: float32 [sum lens, dim], the queries' tokens in order; lens: int [n] tokens per query;
        out: float32 flat C-contiguous, ``code_bytes * 256 * sum(lens)`` elements: query i's
        table ``[code_bytes * 256, lens[i]]`` at offset ``code_bytes * 256 * sum(lens[:i])``.
        Queries of one length are computed in one stacked product (fewer numpy calls: on one
        core with another search thread beside it, each call may hand the GIL over)."""
        t = self._sub_np
        if t is None:
            t = self._sub_np = np.ascontiguousarray(self.sub_tables(), dtype=np.float32)
        B, _, w = t.shape
        L = self.query_layout(np.asarray(Q, np.float32))  # [sum lens, B * w]; rows independent
        lens = np.asarray(lens, np.int64)
        if len(lens) and (lens == lens[0]).all():  # [n, B, w, m] -> [n, B, 256, m]: each query's block
            n, m = len(lens), int(lens[0])
            qs = np.ascontiguousarray(L.reshape(n, m, B, w).transpose(0, 2, 3, 1))
            np.matmul(t, qs, out=out.reshape(n, B, 256, m))
            return
        row = off = 0
        for m in lens.tolist():
            qs = np.ascontiguousarray(L[row : row + m].reshape(m, B, w).transpose(1, 2, 0))  # [B, w, m]
            # numpy's stacked matmul: 3-6x faster than torch.bmm or einsum for these B tiny products
            np.matmul(t, qs, out=out[off : off + B * 256 * m].reshape(B, 256, m))
            row += m
            off += B * 256 * m

    def query_layout(self, q: np.ndarray) -> np.ndarray:
        """float32 [m, dim] query tokens as the sub-tables see them: [m, code_bytes * w]
        (identity here; a rotating or padding codec transforms them)."""
        return q

    def decoded_norms(self, centroids: np.ndarray, codes: np.ndarray, residual_codes: np.ndarray) -> np.ndarray:
        """``‖centroid + decoded residual‖`` of tokens: float32 ``[n]`` (what search renormalises by).

        centroids: float32 [C, dim]; codes: int [n] centroid ids; residual_codes: uint8 [n, code_bytes].
        """
        x = self.decode_numpy(np.ascontiguousarray(residual_codes))
        x += centroids[codes]
        return np.sqrt(np.einsum("ij,ij->i", x, x))

    def params(self) -> Dict:
        """JSON-serialisable parameters recorded in the manifest."""
        raise NotImplementedError

    def arrays(self) -> Dict[str, np.ndarray]:
        """Learned arrays to store in the index (name -> array)."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "ResidualCodec":
        """Move the decoding tables to ``device``; returns self."""
        raise NotImplementedError


class _Compiled:
    """A kernel of :mod:`plaid._codecs_numba`, imported on first use. ``fn``: None (not loaded
    yet), the function, or False once it could not be imported or compiled (then the caller's
    fallback computes the same result, after ONE warning ending in ``fallback``)."""

    def __init__(self, name: str, what: str, fallback: str, search_path: bool = False):
        self.name, self.what, self.fallback, self.search_path = name, what, fallback, search_path
        self.fn = None

    def get(self):
        """The function, or None (use the fallback). A search-path kernel is not used with
        ``PLAID_NO_NUMBA`` set, nor while numba is loading in the background (``plaid._loading``)."""
        if self.search_path and (_loading.busy() or os.environ.get("PLAID_NO_NUMBA", "") not in ("", "0")):
            return None
        if self.fn is None:
            try:
                from . import _codecs_numba

                self.fn = getattr(_codecs_numba, self.name)
            except Exception as e:  # ImportError, or a broken numba / llvmlite install
                self.failed(e)
        return self.fn or None

    def failed(self, e: BaseException) -> None:
        """Give up on the kernel (a compile failure on its first call): one warning."""
        if self.fn is not False:
            self.fn = False
            warnings.warn(f"plaid: {self.what} unavailable ({type(e).__name__}: {e}); {self.fallback}",
                          RuntimeWarning, stacklevel=3)


#: The compiled PQ encoder; without it faiss encodes: the same codes, about 10x slower at
#: sub-vectors of 2-5 dimensions, where faiss scores one vector at a time.
_PQ = _Compiled("pq_encode", "compiled PQ encoder", "encoding with faiss (same codes, slower)")
#: The compiled query rotation; without it BLAS rotates (``PLAID_NO_NUMBA`` set: BLAS, as the
#: search's kernels then run without numba, which is not even imported).
_ROT = _Compiled("rotate_rows", "compiled query rotation", "rotating with BLAS", search_path=True)


def allocate_widths(variances: np.ndarray, m: int, dim: int) -> Tuple[int, ...]:
    """Split ``dim`` dimensions, in order, into ``m`` contiguous sub-vectors of one byte each,
    giving more bytes per dimension where the variance is larger.

    variances: float [dim] (e.g. the eigenvalues of the residuals' covariance, largest first).
    The classic allocation for independent Gaussian components gives dimension ``i`` a rate
    ``½·log2(var_i / geometric mean)`` above the average; the cuts fall where the cumulative rate
    crosses each multiple of 8 bits. Every sub-vector has at least one dimension.
    """
    v = np.maximum(np.asarray(variances, np.float64), 1e-30)
    rate = 0.5 * np.log2(v / np.exp(np.mean(np.log(v)))) + 8.0 * m / dim
    rate = np.maximum(rate, MIN_RATE)
    cum = np.concatenate([[0.0], np.cumsum(rate)])
    cuts = [0]
    for k in range(1, m):
        c = int(np.argmin(np.abs(cum - k * cum[-1] / m)))
        cuts.append(min(max(c, cuts[-1] + 1), dim - (m - k)))
    cuts.append(dim)
    return tuple(int(w) for w in np.diff(cuts))


def even_widths(dim: int, m: int) -> Tuple[int, ...]:
    """``m`` contiguous widths summing to ``dim``, as equal as possible (larger ones first)."""
    q, r = divmod(dim, m)
    return tuple([q + 1] * r + [q] * (m - r))


class PQCodec(ResidualCodec):
    """Residual product quantisation with 8-bit sub-quantisers.

    The residual (optionally rotated, see ``rotation``) is cut into ``m`` contiguous sub-vectors;
    each is replaced by the index of the nearest of 256 learned sub-centroids: ``m`` bytes per
    token. Sub-vectors may differ in width (``widths``), so ``m`` need not divide ``dim``.

    Parameters
    ----------
    dim : int
        Vector dimension.
    m : int, default 32
        Number of sub-quantisers, i.e. bytes per token, 1 <= m <= dim (16, 32, 64 are typical;
        32 keeps recall@10 > 0.9 of exhaustive MaxSim on 128-d ColBERT-style vectors, 64 > 0.96).
    train_iters : int, default 10
        k-means iterations of each sub-quantiser.
    rotation : bool, default False
        Rotate residuals onto the principal axes of the training residuals first (a learned
        orthogonal ``dim x dim`` matrix, stored in the index) and give the high-variance axes
        narrower sub-vectors (:func:`allocate_widths`). Search rotates each query token once,
        so scoring stays a sum of table entries.
    widths : sequence of int or None, default None
        Explicit sub-vector widths (``m`` positive integers summing to ``dim``). None: equal
        widths (as equal as possible when ``m`` does not divide ``dim``), or the allocation
        by variance when ``rotation``.
    """

    name = "pq"

    def __init__(self, dim: int, m: int = 32, train_iters: int = 10, rotation: bool = False,
                 widths: Optional[Sequence[int]] = None):
        dim, m = int(dim), int(m)
        if not 1 <= m <= dim:
            raise InvalidInputError(f"pq: the number of sub-quantisers m={m} must be between 1 and the dimension {dim}")
        if widths is not None:
            widths = tuple(int(w) for w in widths)
            if len(widths) != m or min(widths) < 1 or sum(widths) != dim:
                raise InvalidInputError(f"pq: widths must be {m} positive integers summing to the dimension {dim}")
        self.dim, self.m, self.train_iters, self.rotation = dim, m, int(train_iters), bool(rotation)
        self.code_bytes = m
        self.widths: Optional[Tuple[int, ...]] = widths if widths is not None else \
            (None if rotation else even_widths(dim, m))
        self.codebooks: np.ndarray | None = None  # float32 [m, 256, max(widths)]
        self.rotation_matrix: np.ndarray | None = None  # float32 [dim, dim] when rotation
        self._rot64: np.ndarray | None = None
        self._pq = None
        self._books_t: np.ndarray | None = None  # float32 [m, W, 256]: what the compiled encoder reads
        self._table: torch.Tensor | None = None  # float32 [m * 256, W]
        self._shift: torch.Tensor | None = None
        self._np_table: np.ndarray | None = None
        self._np_shift: np.ndarray | None = None
        self._set_layout()

    # -- the padded layout: sub-vector j occupies columns j*W .. j*W + widths[j] - 1 of [m * W] --
    def _set_layout(self) -> None:
        self._layout = self._inverse = None
        self._rot_t = None
        if self.widths is None:
            return
        W = max(self.widths)
        self.sub_width = W
        if all(w == W for w in self.widths):
            return  # identity: no padding
        layout = np.full((self.m, W), self.dim, np.int64)  # column `dim`: a zero
        start = 0
        for j, w in enumerate(self.widths):
            layout[j, :w] = np.arange(start, start + w)
            start += w
        self._layout = layout.ravel()
        self._inverse = np.flatnonzero(self._layout < self.dim)  # padded column of each dimension

    def _rotate(self, x: np.ndarray, inverse: bool = False) -> np.ndarray:
        """``x @ P`` (or ``x @ P.T``) as float32, computed in float64: BLAS sums in an order that
        depends on its thread count, and float64's rounding vanishes in the float32 result, so
        an index and its scores do not depend on the threads (a shard encoded by a Ray worker is
        byte-identical to the same shard encoded here)."""
        if self._rot64 is None:
            self._rot64 = self.rotation_matrix.astype(np.float64)
        r = self._rot64.T if inverse else self._rot64
        return (np.asarray(x, np.float64) @ r).astype(np.float32)

    def _to_layout(self, x: np.ndarray, rotate=None) -> np.ndarray:
        """float32 [n, dim] -> [n, m * W]: rotated (by ``rotate``, default :meth:`_rotate`), cut into
        sub-vectors, zero-padded."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.rotation_matrix is not None:
            x = (rotate or self._rotate)(x)
        if self._layout is None:
            return np.ascontiguousarray(x)
        ext = np.concatenate([x, np.zeros((len(x), 1), np.float32)], axis=1)
        return np.ascontiguousarray(np.take(ext, self._layout, axis=1))

    def _from_layout(self, z: np.ndarray) -> np.ndarray:
        """[n, m * W] -> float32 [n, dim] (the inverse of :meth:`_to_layout`)."""
        if self._inverse is not None:
            z = np.take(z, self._inverse, axis=1)
        if self.rotation_matrix is not None:
            z = self._rotate(z, inverse=True)
        return np.ascontiguousarray(z, dtype=np.float32)

    def query_layout(self, q: np.ndarray) -> np.ndarray:
        return self._to_layout(q, self._rotate_queries)

    def _rotate_queries(self, x: np.ndarray) -> np.ndarray:
        """:meth:`_rotate` for query tokens, by the compiled kernel (float64 sums in a fixed order:
        the same float32 values but for a last-bit rounding once in ~10^8). BLAS runs a product of
        a few hundred rows on its own threads, which keep spinning after it and took the core of
        the search's other thread: a one-thread search used 2 cores, two threads searching parts
        of 8 queries were slower than one."""
        kernel = _ROT.get()
        if kernel is not None:
            if self._rot64 is None:
                self._rot64 = self.rotation_matrix.astype(np.float64)
            out = np.empty(x.shape, np.float32)
            try:
                kernel(np.ascontiguousarray(x, np.float32), self._rot64, out)
                return out
            except Exception as e:  # a compile failure: BLAS from now on
                _ROT.failed(e)
        return self._rotate(x)

    def train(self, residuals: np.ndarray, seed: int = 0) -> None:
        x = np.ascontiguousarray(residuals, dtype=np.float32)
        if len(x) < 1024:
            # Tiny corpora: each sub-quantiser needs at least 256 points; repeat the sample with
            # a small jitter (1% of its spread) so training stays well defined.
            rng = np.random.default_rng(seed)
            reps = -(-1024 // max(len(x), 1))
            x = np.tile(x, (reps, 1))
            x = x + rng.normal(0, 0.01 * (x.std() + 1e-6), x.shape).astype(np.float32)
        if self.rotation:
            cov = np.cov(x.astype(np.float64), rowvar=False).reshape(self.dim, self.dim)
            eigval, eigvec = np.linalg.eigh(cov)
            order = np.argsort(-eigval, kind="stable")
            # sign convention: each axis's largest component positive (a deterministic matrix)
            vec = eigvec[:, order]
            vec *= np.where(vec[np.abs(vec).argmax(axis=0), np.arange(self.dim)] < 0, -1.0, 1.0)
            self.rotation_matrix = np.ascontiguousarray(vec, dtype=np.float32)
            self._rot64 = None
            if self.widths is None:
                self.widths = allocate_widths(eigval[order], self.m, self.dim)
            self._set_layout()
        W = self.sub_width
        pq = faiss.ProductQuantizer(self.m * W, self.m, 8)
        pq.cp.niter = self.train_iters
        pq.cp.seed = int(seed)
        pq.cp.max_points_per_centroid = 256
        pq.cp.min_points_per_centroid = 1  # no faiss warning for small samples
        pq.train(self._to_layout(x))
        self._pq = pq
        cb = faiss.vector_to_array(pq.centroids).reshape(self.m, 256, W)
        if self._layout is not None:  # padding columns are zero (all their points are); make it exact
            cb = cb * (self._layout < self.dim).reshape(self.m, 1, W)
        self.codebooks = np.ascontiguousarray(cb, dtype=np.float32)
        self._books_t = None
        self._table = None
        self._sub_np = None
        self._np_table = None

    def _faiss_pq(self):
        if self._pq is None:
            pq = faiss.ProductQuantizer(self.m * self.sub_width, self.m, 8)
            faiss.copy_array_to_vector(np.ascontiguousarray(self.codebooks, np.float32).ravel(), pq.centroids)
            self._pq = pq
        return self._pq

    def encode(self, residuals: np.ndarray) -> np.ndarray:
        z = self._to_layout(residuals)
        kernel = _PQ.get()
        if kernel is not None:
            if self._books_t is None:
                self._books_t = np.ascontiguousarray(self.codebooks.transpose(0, 2, 1), dtype=np.float32)
            out = np.empty((len(z), self.m), np.uint8)
            try:
                kernel(z, self._books_t, out)
                return out
            except Exception as e:  # a compile failure: faiss from now on (the same nearest sub-centroids)
                _PQ.failed(e)
        return self._faiss_pq().compute_codes(z).reshape(len(z), self.m)

    def to(self, device) -> "PQCodec":
        self._table = torch.from_numpy(self.codebooks.reshape(self.m * 256, -1)).to(device)
        self._shift = (torch.arange(self.m, device=device) * 256).to(torch.int32)
        self._inverse_t = None if self._inverse is None else torch.from_numpy(self._inverse).to(device)
        self._rot_t = None if self.rotation_matrix is None else torch.from_numpy(self.rotation_matrix).to(device)
        return self

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self._table is None or self._table.device != codes.device:
            self.to(codes.device)
        idx = codes.to(torch.int32) + self._shift  # [n, m]
        z = self._table[idx.reshape(-1)].reshape(codes.shape[0], self.m * self.sub_width)
        if self._inverse_t is not None:
            z = z.index_select(1, self._inverse_t)
        return z @ self._rot_t.T if self._rot_t is not None else z

    def decode_numpy(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self._np_table is None:
            self._np_table = np.ascontiguousarray(self.codebooks.reshape(self.m * 256, -1), dtype=np.float32)
            self._np_shift = (np.arange(self.m, dtype=np.int32) * 256)
        n = len(codes)
        idx = np.add(codes, self._np_shift, dtype=np.int32)
        if self._layout is None and self.rotation_matrix is None:
            if out is None:
                out = np.empty((n, self.dim), np.float32)
            np.take(self._np_table, idx.ravel(), axis=0, out=out.reshape(n * self.m, self.sub_width))
            return out
        z = np.take(self._np_table, idx.ravel(), axis=0).reshape(n, self.m * self.sub_width)
        x = self._from_layout(z)
        if out is None:
            return x
        out[...] = x
        return out

    def sub_tables(self) -> np.ndarray:
        return self.codebooks

    def params(self) -> Dict:
        p = {"name": self.name, "m": self.m, "nbits": 8, "code_bytes": self.code_bytes}
        if self.rotation or self.widths != even_widths(self.dim, self.m) or self.dim % self.m:
            p["widths"] = list(self.widths)
            p["rotation"] = self.rotation
        return p

    def arrays(self) -> Dict[str, np.ndarray]:
        a = {"pq_codebooks": self.codebooks}
        if self.rotation_matrix is not None:
            a["pq_rotation"] = self.rotation_matrix
        return a

    @classmethod
    def load(cls, dim: int, params: Dict, arrays: Dict[str, np.ndarray]) -> "PQCodec":
        rotation = bool(params.get("rotation", False))
        c = cls(dim, m=params["m"], rotation=rotation, widths=params.get("widths") or even_widths(dim, params["m"]))
        cb = np.asarray(arrays["pq_codebooks"], dtype=np.float32)
        if cb.shape != (c.m, 256, c.sub_width):
            raise ValueError(f"pq_codebooks has shape {cb.shape}, expected {(c.m, 256, c.sub_width)}")
        c.codebooks = cb
        if rotation:
            r = np.asarray(arrays["pq_rotation"], dtype=np.float32)
            if r.shape != (dim, dim):
                raise ValueError(f"pq_rotation has shape {r.shape}, expected {(dim, dim)}")
            c.rotation_matrix = np.ascontiguousarray(r)
        return c


class ScalarCodec(ResidualCodec):
    """ColBERTv2 residual compression: ``nbits`` bits per dimension.

    Each residual coordinate is bucketed by ``2**nbits - 1`` cutoffs (quantiles of all training
    residual values) and decoded to the bucket's weight (the quantile at the bucket's middle).

    Parameters
    ----------
    dim : int
        Vector dimension; ``dim * nbits`` must be a multiple of 8.
    nbits : {1, 2, 4}, default 2
        Bits per dimension: 128-d vectors take 16, 32 or 64 bytes per token.
    """

    name = "scalar"

    def __init__(self, dim: int, nbits: int = 2):
        if nbits not in (1, 2, 4):
            raise InvalidInputError(f"scalar codec: nbits must be 1, 2 or 4, got {nbits}")
        if (dim * nbits) % 8:
            raise InvalidInputError(f"scalar codec: dim * nbits = {dim}*{nbits} must be a multiple of 8")
        self.dim, self.nbits = int(dim), int(nbits)
        self.code_bytes = self.dim * self.nbits // 8
        self.cutoffs: np.ndarray | None = None  # float32 [2**nbits - 1]
        self.weights: np.ndarray | None = None  # float32 [2**nbits]
        self._lut: torch.Tensor | None = None  # float32 [256, 8 // nbits]
        self._np_lut: np.ndarray | None = None

    def train(self, residuals: np.ndarray, seed: int = 0) -> None:
        k = 1 << self.nbits
        flat = np.asarray(residuals, dtype=np.float32).ravel()
        self.cutoffs = np.quantile(flat, np.arange(1, k) / k).astype(np.float32)
        self.weights = np.quantile(flat, np.arange(k) / k + 0.5 / k).astype(np.float32)
        self._lut = None
        self._sub_np = None
        self._np_lut = None

    def encode(self, residuals: np.ndarray) -> np.ndarray:
        x = np.asarray(residuals, dtype=np.float32)
        buckets = np.searchsorted(self.cutoffs, x, side="right").astype(np.uint8)  # [n, dim]
        per = 8 // self.nbits
        b = buckets.reshape(len(x), self.code_bytes, per)
        out = np.zeros((len(x), self.code_bytes), np.uint8)
        for j in range(per):  # most significant bits first
            out |= b[:, :, j] << np.uint8(self.nbits * (per - 1 - j))
        return out

    def _byte_table(self) -> np.ndarray:
        """float32 [256, 8 // nbits]: the decoded weights of every possible code byte."""
        per = 8 // self.nbits
        byte = np.arange(256)
        mask = (1 << self.nbits) - 1
        idx = np.stack([(byte >> (self.nbits * (per - 1 - j))) & mask for j in range(per)], 1)
        return np.ascontiguousarray(self.weights[idx], dtype=np.float32)

    def to(self, device) -> "ScalarCodec":
        self._lut = torch.from_numpy(self._byte_table()).to(device)
        return self

    def decode_numpy(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self._np_lut is None:
            self._np_lut = self._byte_table()
        n = len(codes)
        if out is None:
            out = np.empty((n, self.dim), np.float32)
        np.take(self._np_lut, codes.ravel(), axis=0, out=out.reshape(n * self.code_bytes, 8 // self.nbits))
        return out

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self._lut is None or self._lut.device != codes.device:
            self.to(codes.device)
        return self._lut[codes.reshape(-1).long()].reshape(codes.shape[0], self.dim)

    def sub_tables(self) -> np.ndarray:
        return np.broadcast_to(self._byte_table(), (self.code_bytes, 256, 8 // self.nbits))

    def params(self) -> Dict:
        return {"name": self.name, "nbits": self.nbits, "code_bytes": self.code_bytes}

    def arrays(self) -> Dict[str, np.ndarray]:
        return {"bucket_cutoffs": self.cutoffs, "bucket_weights": self.weights}

    @classmethod
    def load(cls, dim: int, params: Dict, arrays: Dict[str, np.ndarray]) -> "ScalarCodec":
        c = cls(dim, nbits=params["nbits"])
        c.cutoffs = np.asarray(arrays["bucket_cutoffs"], np.float32)
        c.weights = np.asarray(arrays["bucket_weights"], np.float32)
        k = 1 << c.nbits
        if c.cutoffs.shape != (k - 1,) or c.weights.shape != (k,):
            raise ValueError("bucket_cutoffs / bucket_weights have the wrong shape for nbits")
        return c


CODECS = {"pq": PQCodec, "scalar": ScalarCodec}


def make_codec(name: str, dim: int, *, pq_m: int = 32, nbits: int = 2, rotation: bool = False) -> ResidualCodec:
    """An untrained codec by name: ``"pq"`` (uses ``pq_m`` and ``rotation``) or ``"scalar"``
    (uses ``nbits``)."""
    if name == "pq":
        return PQCodec(dim, m=pq_m, rotation=rotation)
    if name == "scalar":
        return ScalarCodec(dim, nbits=nbits)
    raise InvalidInputError(f"unknown codec {name!r}; choose 'pq' or 'scalar'")


def check_codec_params(dim: int, params) -> Dict:
    """Validate a manifest's codec parameters for vectors of ``dim`` dimensions.

    Returns them as a plain dict; raises ``ValueError`` naming the field that is missing, of the
    wrong type or inconsistent (e.g. ``code_bytes`` that does not match ``m`` or ``nbits``).
    """
    if not isinstance(params, dict):
        raise ValueError(f"codec must be an object, got {type(params).__name__}")

    def integer(key):
        v = params.get(key)
        if type(v) is not int:
            raise ValueError(f"codec.{key} must be an integer, got {v!r}")
        return v

    name = params.get("name")
    if name == "pq":
        m, nbits, code_bytes = integer("m"), integer("nbits"), integer("code_bytes")
        if not 1 <= m <= dim:
            raise ValueError(f"codec.m={m} is not between 1 and the dimension {dim}")
        if nbits != 8:
            raise ValueError(f"codec.nbits={nbits}: the pq codec uses 8 bits per sub-quantiser")
        if code_bytes != m:
            raise ValueError(f"codec.code_bytes={code_bytes} differs from codec.m={m}")
        out = {"name": "pq", "m": m, "nbits": 8, "code_bytes": m}
        if "widths" in params or "rotation" in params:
            widths, rotation = params.get("widths"), params.get("rotation")
            if not isinstance(widths, list) or len(widths) != m or \
                    any(type(w) is not int or w < 1 for w in widths) or sum(widths) != dim:
                raise ValueError(f"codec.widths must be a list of {m} positive integers summing to {dim}, "
                                 f"got {widths!r:.80}")
            if type(rotation) is not bool:
                raise ValueError(f"codec.rotation must be true or false, got {rotation!r:.40}")
            out.update(widths=list(widths), rotation=rotation)
        elif dim % m:
            raise ValueError(f"codec.m={m} does not divide the dimension {dim} and codec.widths is missing")
        return out
    if name == "scalar":
        nbits, code_bytes = integer("nbits"), integer("code_bytes")
        if nbits not in (1, 2, 4) or (dim * nbits) % 8:
            raise ValueError(f"codec.nbits={nbits} is not 1, 2 or 4 with dim * nbits a multiple of 8 (dim {dim})")
        if code_bytes != dim * nbits // 8:
            raise ValueError(f"codec.code_bytes={code_bytes}, expected dim * nbits / 8 = {dim * nbits // 8}")
        return {"name": "scalar", "nbits": nbits, "code_bytes": code_bytes}
    raise ValueError(f"unknown codec.name {name!r} (this plaid knows 'pq' and 'scalar')")


def codec_array_specs(dim: int, params: Dict) -> Dict[str, tuple]:
    """The arrays a codec stores: name -> (dtype, shape). ``params`` as from :func:`check_codec_params`."""
    if params["name"] == "pq":
        m = params["m"]
        f32 = np.dtype(np.float32)
        specs = {"pq_codebooks": (f32, (m, 256, max(params.get("widths") or [dim // m])))}
        if params.get("rotation"):
            specs["pq_rotation"] = (f32, (dim, dim))
        return specs
    k = 1 << params["nbits"]
    return {"bucket_cutoffs": (np.dtype(np.float32), (k - 1,)), "bucket_weights": (np.dtype(np.float32), (k,))}


def codec_from_manifest(dim: int, params: Dict, arrays: Dict[str, np.ndarray]) -> ResidualCodec:
    """Rebuild a trained codec from its (validated) manifest params and stored arrays."""
    cls = CODECS.get(params.get("name"))
    if cls is None:
        raise ValueError(f"unknown codec {params.get('name')!r}")
    return cls.load(dim, params, arrays)


class NormQuantizer:
    """One byte per token norm: an index into ``NORM_LEVELS`` increasing values.

    A renormalising index divides a token's decoded vector ``x̂ = centroid + decode(residual)``
    by ``‖x̂‖`` at search time. Storing that norm as float16 costs 2 bytes per token for 11 bits of
    precision that nothing needs: the decoded norms of unit vectors lie in a narrow band (on
    msmarco-5k, 0.73-1.09). :meth:`fit` spaces ``NORM_CORE_LEVELS`` values evenly in log space
    over the training sample's band (a norm inside is rounded within ±0.1%, a twentieth of the
    codec's own error on the same scores), and ``NORM_TAIL_LEVELS`` more on each side, spaced
    geometrically out to ``NORM_TAIL_FACTOR`` times beyond it, for tokens added later that decode
    outside the band (clipped only beyond that). Search reads ``values[code]`` (float32 [256]);
    any increasing table of finite positive values is valid.
    """

    def __init__(self, values: np.ndarray):
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (NORM_LEVELS,) or not np.isfinite(values).all() or not (values > 0).all() \
                or not (np.diff(values) > 0).all():
            raise ValueError(f"norm_values must be {NORM_LEVELS} finite, positive, increasing float32 values")
        self.values = values
        logs = np.log(values.astype(np.float64))
        self._cuts = (logs[1:] + logs[:-1]) / 2  # a norm takes the level whose log is nearest

    @classmethod
    def fit(cls, norms: np.ndarray) -> "NormQuantizer":
        """A table for ``norms`` (float [n] > 0, the training sample's decoded norms)."""
        norms = np.asarray(norms, dtype=np.float64)
        norms = norms[np.isfinite(norms) & (norms > 0)]
        if len(norms) == 0:
            norms = np.ones(1)
        lo, hi = np.log(norms.min()), np.log(norms.max())
        if hi - lo < np.log(NORM_MIN_SPAN):
            mid = (lo + hi) / 2
            lo, hi = mid - np.log(NORM_MIN_SPAN) / 2, mid + np.log(NORM_MIN_SPAN) / 2
        core = np.linspace(lo, hi, NORM_CORE_LEVELS)
        # tails: geometric steps growing away from the core, out to NORM_TAIL_FACTOR beyond it
        step = core[1] - core[0]
        reach = np.log(NORM_TAIL_FACTOR)
        ratio = _tail_ratio(step, reach, NORM_TAIL_LEVELS)
        offsets = step * np.cumsum(ratio ** np.arange(1, NORM_TAIL_LEVELS + 1))
        logs = np.concatenate([lo - offsets[::-1], core, hi + offsets])
        # float32 values, kept finite, positive and distinct whatever the sample
        logs = np.clip(logs, np.log(2.0**-100), np.log(2.0**100))
        values = np.exp(logs).astype(np.float32)
        values = np.maximum.accumulate(values)
        for i in range(1, len(values)):  # distinct after rounding to float32
            if values[i] <= values[i - 1]:
                values[i] = np.nextafter(values[i - 1], np.float32(np.inf))
        return cls(values)

    def encode(self, norms: np.ndarray) -> np.ndarray:
        """float [n] -> uint8 [n]: the level nearest in log space (the ends beyond the table)."""
        x = np.log(np.maximum(np.asarray(norms, np.float64), 1e-30))
        return np.searchsorted(self._cuts, x).astype(np.uint8)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """uint8 [n] -> float32 [n]."""
        return self.values[np.asarray(codes, np.uint8)]


def _tail_ratio(step: float, reach: float, n: int) -> float:
    """The ratio r > 1 with ``step * (r + r^2 + ... + r^n) = reach`` (bisection)."""
    lo, hi = 1.0, 4.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if step * np.sum(mid ** np.arange(1, n + 1)) < reach:
            lo = mid
        else:
            hi = mid
    return hi


def quantize_centroids(centroids: np.ndarray) -> Dict[str, np.ndarray]:
    """Centroids as stored: ``centroids`` int8 [C, d] and ``centroid_scales`` float32 [C]
    (row ``i`` decodes to ``centroids[i] * centroid_scales[i]``; see :func:`dequantize_centroids`).

    One byte per dimension instead of float16's two: the rounding error (at most half a step,
    ``max|c_i| / 254``) moves a unit-scale centroid by ~0.3%, and costs no accuracy in the
    residuals, which are always taken against the stored (dequantized) centroids.
    """
    c = np.asarray(centroids, dtype=np.float32)
    amax = np.abs(c).max(axis=1) if c.size else np.zeros(len(c), np.float32)
    scales = (amax / 127.0).astype(np.float32)
    safe = np.where(scales > 0, scales, 1.0).astype(np.float32)
    q = np.clip(np.rint(c / safe[:, None]), -127, 127).astype(np.int8)
    return {"centroids": q, "centroid_scales": scales}


def dequantize_centroids(q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """int8 [C, d], float32 [C] -> float32 [C, d]."""
    return np.asarray(q, np.float32) * np.asarray(scales, np.float32)[:, None]
