"""Residual codecs: compress ``token - centroid`` residuals into a few bytes per token.

Two codecs share one small interface (:class:`ResidualCodec`):

* :class:`PQCodec` — residual product quantisation (faiss ``ProductQuantizer``): the residual is
  split into ``m`` sub-vectors, each replaced by the id of the nearest of 256 learned
  sub-centroids: ``m`` bytes per token. The default: more fidelity per byte than scalar buckets.
* :class:`ScalarCodec` — ColBERTv2's buckets: every dimension of the residual is quantised to
  ``nbits`` bits with cutoffs and weights taken from quantiles of the training residuals:
  ``dim * nbits / 8`` bytes per token.

Both are *byte-decomposable*: byte ``j`` of a code decodes on its own into the ``d / code_bytes``
contiguous dimensions ``j * d/code_bytes ...`` of the residual. So a query's dot products with
every possible byte at every position fit one small table (:meth:`ResidualCodec.score_table`,
``[code_bytes * 256, m]``), and a token's residual score is the sum of ``code_bytes`` entries of
it: asymmetric distance computation, which CPU search uses instead of decoding.

Training and encoding use numpy/faiss (indexing side); decoding uses torch so that search can
run it on any device.
"""
from __future__ import annotations

from typing import Dict

import faiss
import numpy as np
import torch

from .errors import InvalidInputError

__all__ = ["ResidualCodec", "PQCodec", "ScalarCodec", "make_codec", "codec_from_manifest", "check_codec_params",
           "codec_array_specs"]


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

    def score_table(self, q: np.ndarray) -> torch.Tensor:
        """Dot products of query tokens with every decodable byte, for scoring without decoding.

        q: float32 ``[m, dim]``. Returns float32 ``[code_bytes * 256, m]`` (CPU) whose row
        ``j * 256 + b`` holds ``<q_i, part j of a residual whose byte j is b>``; the residual score
        of a token with codes ``c`` is ``sum_j table[j * 256 + c[j]]``.
        """
        t = self._sub_np
        if t is None:
            t = self._sub_np = np.ascontiguousarray(self.sub_tables(), dtype=np.float32)
        B, _, w = t.shape
        qs = np.ascontiguousarray(np.asarray(q, np.float32).reshape(len(q), B, w).transpose(1, 2, 0))  # [B, w, m]
        # numpy's stacked matmul: 3-6x faster than torch.bmm or einsum for these B tiny products
        return torch.from_numpy(np.matmul(t, qs).reshape(B * 256, len(q)))

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


class PQCodec(ResidualCodec):
    """Residual product quantisation with 8-bit sub-quantisers.

    Parameters
    ----------
    dim : int
        Vector dimension; must be divisible by ``m``.
    m : int, default 32
        Number of sub-quantisers, i.e. bytes per token (16, 32, 64 are typical; 32 keeps
        recall@10 > 0.9 of exhaustive MaxSim on 128-d ColBERT-style vectors, 64 > 0.96).
    train_iters : int, default 10
        k-means iterations of each sub-quantiser.
    """

    name = "pq"

    def __init__(self, dim: int, m: int = 32, train_iters: int = 10):
        if m <= 0 or dim % m:
            raise InvalidInputError(
                f"pq: the dimension {dim} must be divisible by the number of sub-quantisers m={m}"
            )
        self.dim, self.m, self.train_iters = int(dim), int(m), int(train_iters)
        self.code_bytes = self.m
        self.codebooks: np.ndarray | None = None  # float32 [m, 256, dim // m]
        self._pq = None
        self._table: torch.Tensor | None = None  # float32 [m * 256, dim // m]
        self._shift: torch.Tensor | None = None
        self._np_table: np.ndarray | None = None
        self._np_shift: np.ndarray | None = None

    def train(self, residuals: np.ndarray, seed: int = 0) -> None:
        x = np.ascontiguousarray(residuals, dtype=np.float32)
        if len(x) < 1024:
            # Tiny corpora: each sub-quantiser needs at least 256 points; repeat the sample with
            # a small jitter (1% of its spread) so training stays well defined.
            rng = np.random.default_rng(seed)
            reps = -(-1024 // max(len(x), 1))
            x = np.tile(x, (reps, 1))
            x = x + rng.normal(0, 0.01 * (x.std() + 1e-6), x.shape).astype(np.float32)
        pq = faiss.ProductQuantizer(self.dim, self.m, 8)
        pq.cp.niter = self.train_iters
        pq.cp.seed = int(seed)
        pq.cp.max_points_per_centroid = 256
        pq.cp.min_points_per_centroid = 1  # no faiss warning for small samples
        pq.train(x)
        self._pq = pq
        self.codebooks = faiss.vector_to_array(pq.centroids).reshape(self.m, 256, self.dim // self.m)
        self._table = None
        self._sub_np = None
        self._np_table = None

    def _faiss_pq(self):
        if self._pq is None:
            pq = faiss.ProductQuantizer(self.dim, self.m, 8)
            faiss.copy_array_to_vector(np.ascontiguousarray(self.codebooks, np.float32).ravel(), pq.centroids)
            self._pq = pq
        return self._pq

    def encode(self, residuals: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(residuals, dtype=np.float32)
        return self._faiss_pq().compute_codes(x).reshape(len(x), self.m)

    def to(self, device) -> "PQCodec":
        self._table = torch.from_numpy(self.codebooks.reshape(self.m * 256, -1)).to(device)
        self._shift = (torch.arange(self.m, device=device) * 256).to(torch.int32)
        return self

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if self._table is None or self._table.device != codes.device:
            self.to(codes.device)
        idx = codes.to(torch.int32) + self._shift  # [n, m]
        return self._table[idx.reshape(-1)].reshape(codes.shape[0], self.dim)

    def decode_numpy(self, codes: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        if self._np_table is None:
            self._np_table = np.ascontiguousarray(self.codebooks.reshape(self.m * 256, -1), dtype=np.float32)
            self._np_shift = (np.arange(self.m, dtype=np.int32) * 256)
        n = len(codes)
        if out is None:
            out = np.empty((n, self.dim), np.float32)
        idx = np.add(codes, self._np_shift, dtype=np.int32)
        np.take(self._np_table, idx.ravel(), axis=0, out=out.reshape(n * self.m, self.dim // self.m))
        return out

    def sub_tables(self) -> np.ndarray:
        return self.codebooks

    def params(self) -> Dict:
        return {"name": self.name, "m": self.m, "nbits": 8, "code_bytes": self.code_bytes}

    def arrays(self) -> Dict[str, np.ndarray]:
        return {"pq_codebooks": self.codebooks}

    @classmethod
    def load(cls, dim: int, params: Dict, arrays: Dict[str, np.ndarray]) -> "PQCodec":
        c = cls(dim, m=params["m"])
        cb = np.asarray(arrays["pq_codebooks"], dtype=np.float32)
        if cb.shape != (c.m, 256, dim // c.m):
            raise ValueError(f"pq_codebooks has shape {cb.shape}, expected {(c.m, 256, dim // c.m)}")
        c.codebooks = cb
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


def make_codec(name: str, dim: int, *, pq_m: int = 32, nbits: int = 2) -> ResidualCodec:
    """An untrained codec by name: ``"pq"`` (uses ``pq_m``) or ``"scalar"`` (uses ``nbits``)."""
    if name == "pq":
        return PQCodec(dim, m=pq_m)
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
        if m <= 0 or dim % m:
            raise ValueError(f"codec.m={m} does not divide the dimension {dim}")
        if nbits != 8:
            raise ValueError(f"codec.nbits={nbits}: the pq codec uses 8 bits per sub-quantiser")
        if code_bytes != m:
            raise ValueError(f"codec.code_bytes={code_bytes} differs from codec.m={m}")
        return {"name": "pq", "m": m, "nbits": 8, "code_bytes": m}
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
        return {"pq_codebooks": (np.dtype(np.float32), (m, 256, dim // m))}
    k = 1 << params["nbits"]
    return {"bucket_cutoffs": (np.dtype(np.float32), (k - 1,)), "bucket_weights": (np.dtype(np.float32), (k,))}


def codec_from_manifest(dim: int, params: Dict, arrays: Dict[str, np.ndarray]) -> ResidualCodec:
    """Rebuild a trained codec from its (validated) manifest params and stored arrays."""
    cls = CODECS.get(params.get("name"))
    if cls is None:
        raise ValueError(f"unknown codec {params.get('name')!r}")
    return cls.load(dim, params, arrays)
