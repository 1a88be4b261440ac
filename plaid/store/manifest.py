"""The manifest: format name and version, file naming, and a strict typed reading of every field.

``manifest.json`` is the commit point of an index (see ``docs/FORMAT.md``). It comes from an
untrusted folder, so :func:`parse_manifest` checks every field — presence, JSON type, range, and
consistency with the others — and turns each problem into an :class:`IndexCorruptError` naming
the field. Array file names must be exactly ``<array name>.<generation>.npy``: plain names of the
store's own pattern, so a manifest cannot point outside its folder or at another array's file.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ..codecs import NORM_LEVELS, check_codec_params, codec_array_specs
from ..errors import FormatVersionError, IndexCorruptError, InvalidInputError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "READABLE_VERSIONS", "MANIFEST", "ArrayEntry", "Segment", "Manifest", "parse_manifest",
           "array_file", "ARRAY_FILE_RE", "ARRAY_NAME_RE", "SEGMENT_RE", "TOMBSTONE_RE", "MAX_COUNT",
           "array_specs", "POOLING_METHODS", "MAX_POOL_FACTOR", "MAX_SEARCH_DEPTH", "check_search_depth"]

FORMAT_NAME = "plaid-index"
FORMAT_VERSION = 3
#: Versions this plaid reads. Version 2 (float16 norms, float16 centroids, int32 inverted file)
#: is read as it is; writing to it is refused until ``plaid upgrade`` converts it to version 3.
READABLE_VERSIONS = (2, 3)
MANIFEST = "manifest.json"
ARRAY_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
ARRAY_FILE_RE = re.compile(r"^([a-z][a-z0-9_]*)\.(\d+)\.npy$")
SEGMENT_RE = re.compile(r"^seg(\d+)$")
TOMBSTONE_RE = re.compile(r"^tombstones_g(\d+)$")
#: Largest count or size a manifest may hold (2**53: exact in JSON doubles, beyond any real index).
MAX_COUNT = 1 << 53
#: Centroid ids fit uint16 up to this many centroids; larger indexes store int32 ids.
UINT16_CENTROIDS = 1 << 16
#: The inverted file stores uint16 document ids up to this many documents (format 3), else int32.
UINT16_DOCUMENTS = 1 << 16
#: Token-pooling methods a manifest may record (``pooling.method``), each implemented by
#: :mod:`plaid.indexing.pooling`; another name is an index this plaid cannot add documents to.
POOLING_METHODS = ("ward",)
#: Largest pool factor (``pooling.factor``): 2**53, exact in JSON doubles, beyond any document length.
MAX_POOL_FACTOR = float(1 << 53)
#: Largest ``search.depth`` a manifest may hold (stage budgets this many times the defaults by k).
MAX_SEARCH_DEPTH = 64


def check_search_depth(value, name: str = "search_depth") -> int:
    """``value`` as a search depth (an integer in [1, MAX_SEARCH_DEPTH]), else InvalidInputError
    naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_SEARCH_DEPTH:
        raise InvalidInputError(f"{name} must be an integer in [1, {MAX_SEARCH_DEPTH}], got {value!r}")
    return int(value)


def array_file(name: str, generation: int) -> str:
    """File name of array ``name`` written by ``generation``: ``<name>.<generation>.npy``."""
    if not ARRAY_NAME_RE.match(name):
        raise ValueError(f"bad array name {name!r}")
    return f"{name}.{int(generation)}.npy"


@dataclass(frozen=True)
class ArrayEntry:
    """One array of the manifest: its file, dtype, shape, byte size and CRC-32."""

    file: str
    dtype: np.dtype
    shape: Tuple[int, ...]
    bytes: int
    crc32: int

    def to_json(self) -> dict:
        return {"file": self.file, "dtype": self.dtype.str, "shape": list(self.shape), "bytes": self.bytes,
                "crc32": self.crc32}


@dataclass(frozen=True)
class Segment:
    """Token arrays ``<name>_codes`` / ``_residuals`` / ``_norms`` of documents ``doc_start .. doc_end-1``."""

    name: str
    doc_start: int
    doc_end: int
    num_tokens: int

    def to_json(self) -> dict:
        return {"name": self.name, "doc_start": self.doc_start, "doc_end": self.doc_end,
                "num_tokens": self.num_tokens}


@dataclass(frozen=True)
class Manifest:
    """One committed generation's manifest, every field checked (see ``docs/FORMAT.md``)."""

    generation: int
    dim: int
    num_documents: int
    num_tokens: int
    num_centroids: int
    num_empty_documents: int
    num_deleted: int
    has_doc_ids: bool
    normalized: bool
    outlier_residual_norm: Optional[float]
    codec: Mapping[str, Any]
    segments: Tuple[Segment, ...]
    next_segment: int
    tombstones: Tuple[str, ...]
    arrays: Mapping[str, ArrayEntry]
    created_by: str = ""
    build: Mapping[str, Any] = field(default_factory=dict)
    pooling: Optional[Mapping[str, Any]] = None
    search: Optional[Mapping[str, Any]] = None
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        """The manifest as written to ``manifest.json``."""
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "generation": self.generation,
            "created_by": self.created_by,
            "dim": self.dim,
            "num_documents": self.num_documents,
            "num_tokens": self.num_tokens,
            "num_centroids": self.num_centroids,
            "num_empty_documents": self.num_empty_documents,
            "num_deleted": self.num_deleted,
            "has_doc_ids": self.has_doc_ids,
            "normalized": self.normalized,
            "outlier_residual_norm": self.outlier_residual_norm,
            "codec": dict(self.codec),
            "segments": [s.to_json() for s in self.segments],
            "next_segment": self.next_segment,
            "tombstones": list(self.tombstones),
            "build": dict(self.build),
            "pooling": None if self.pooling is None else dict(self.pooling),
            "search": None if self.search is None else dict(self.search),
            "arrays": {n: e.to_json() for n, e in self.arrays.items()},
        }

    def fields(self) -> Dict[str, Any]:
        """The fields a writer carries into the next generation (``arrays`` as entries)."""
        return {"created_by": self.created_by, "dim": self.dim, "num_documents": self.num_documents,
                "num_tokens": self.num_tokens, "num_centroids": self.num_centroids,
                "num_empty_documents": self.num_empty_documents, "num_deleted": self.num_deleted,
                "has_doc_ids": self.has_doc_ids, "normalized": self.normalized,
                "outlier_residual_norm": self.outlier_residual_norm, "codec": dict(self.codec),
                "segments": list(self.segments), "next_segment": self.next_segment,
                "tombstones": list(self.tombstones), "build": dict(self.build),
                "pooling": None if self.pooling is None else dict(self.pooling),
                "search": None if self.search is None else dict(self.search), "arrays": dict(self.arrays)}

    @property
    def code_bytes(self) -> int:
        return int(self.codec["code_bytes"])

    @property
    def search_depth(self) -> int:
        """The index's default search depth (``search.depth``; 1 when the manifest records none)."""
        return 1 if self.search is None else int(self.search["depth"])


# -- parsing -----------------------------------------------------------------------------------
class _Fields:
    """Typed access to a JSON object's fields; every problem names the field."""

    def __init__(self, obj: Any, where: str, prefix: str = ""):
        if not isinstance(obj, dict):
            raise IndexCorruptError(f"{where}: {prefix.rstrip('.') or 'the manifest'} must be a JSON object, "
                                    f"got {type(obj).__name__}")
        self.obj, self.where, self.prefix = obj, where, prefix

    def bad(self, key: str, why: str) -> IndexCorruptError:
        return IndexCorruptError(f"{self.where}: manifest field {self.prefix}{key!s} {why}")

    def get(self, key: str) -> Any:
        if key not in self.obj:
            raise self.bad(key, "is missing")
        return self.obj[key]

    def int(self, key: str, lo: int = 0, hi: int = MAX_COUNT) -> int:
        v = self.get(key)
        if type(v) is not int:
            raise self.bad(key, f"must be an integer, got {v!r:.60}")
        if not lo <= v <= hi:
            raise self.bad(key, f"= {v} is out of range [{lo}, {hi}]")
        return v

    def bool(self, key: str) -> bool:
        v = self.get(key)
        if type(v) is not bool:
            raise self.bad(key, f"must be true or false, got {v!r:.60}")
        return v

    def str(self, key: str, default: Optional[str] = None) -> str:
        if default is not None and key not in self.obj:
            return default
        v = self.get(key)
        if not isinstance(v, str):
            raise self.bad(key, f"must be a string, got {v!r:.60}")
        return v

    def list(self, key: str) -> list:
        v = self.get(key)
        if not isinstance(v, list):
            raise self.bad(key, f"must be a list, got {type(v).__name__}")
        return v


def _entry(name: str, raw: Any, generation: int, where: str) -> ArrayEntry:
    f = _Fields(raw, where, f"arrays.{name}.")
    file = f.str("file")
    m = ARRAY_FILE_RE.match(file)
    if not m or m.group(1) != name or int(m.group(2)) > generation:
        raise f.bad("file", f"= {file!r:.80} is not this array's own file name ({name}.<generation>.npy, "
                            f"generation <= {generation})")
    try:
        dtype = np.dtype(f.str("dtype"))
    except TypeError:
        raise f.bad("dtype", f"= {raw.get('dtype')!r:.40} is not a NumPy dtype") from None
    if dtype.hasobject:
        raise f.bad("dtype", "is an object dtype (never allowed)")
    shape = f.list("shape")
    if any(type(s) is not int or not 0 <= s <= MAX_COUNT for s in shape):
        raise f.bad("shape", f"= {shape!r:.80} is not a list of non-negative integers")
    return ArrayEntry(file, dtype, tuple(shape), f.int("bytes"), f.int("crc32", 0, (1 << 32) - 1))


def _optional_object(raw: dict, f: _Fields, where: str, name: str, keys: Tuple[str, ...]) -> Optional[_Fields]:
    """Field ``name`` of the manifest: None when null or absent, else typed access to a JSON
    object holding no other keys than ``keys`` (IndexCorruptError naming the field otherwise)."""
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise f.bad(name, f"must be null or a JSON object, got {value!r:.60}")
    extra = sorted(set(value) - set(keys))
    if extra:
        raise _Fields(value, where, f"{name}.").bad(extra[0][:40], f"is not a field of {name} ({', '.join(keys)})")
    return _Fields(value, where, f"{name}.")


def _pooling(raw: dict, f: _Fields, where: str) -> Optional[Mapping[str, Any]]:
    """The ``pooling`` field: null (or absent: format 2 predates it) for an unpooled index, else
    ``{"method": one of POOLING_METHODS, "factor": a number in (1, MAX_POOL_FACTOR]}``."""
    p = _optional_object(raw, f, where, "pooling", ("method", "factor"))
    if p is None:
        return None
    method = p.str("method")
    if method not in POOLING_METHODS:
        raise p.bad("method", f"= {method!r:.40} is not a pooling method this plaid knows "
                              f"({', '.join(POOLING_METHODS)})")
    factor = p.get("factor")
    if type(factor) not in (int, float):
        raise p.bad("factor", f"must be a number, got {factor!r:.60}")
    if not (isinstance(factor, int) or math.isfinite(factor)) or not 1 < factor <= MAX_POOL_FACTOR:
        raise p.bad("factor", f"= {factor!r:.40} is out of range (1, 2**53] (an unpooled index records null)")
    return MappingProxyType({"method": method, "factor": factor})


def array_specs(m: Manifest) -> Dict[str, Tuple[Tuple[np.dtype, ...], Tuple[int, ...]]]:
    """Every array a manifest must list: name -> (allowed dtypes, shape), derived from its counts."""
    i32, i64, u8, u16 = np.dtype(np.int32), np.dtype(np.int64), np.dtype(np.uint8), np.dtype(np.uint16)
    C, N, dim = m.num_centroids, m.num_documents, m.dim
    code_dtypes = (u16, i32) if C <= UINT16_CENTROIDS else (i32,)
    v3 = m.format_version >= 3
    centroids = m.arrays.get("centroids")
    int8_centroids = v3 and centroids is not None and centroids.dtype == np.dtype(np.int8)
    specs: Dict[str, tuple] = {
        "centroids": ((np.dtype(np.float16), np.dtype(np.float32)) + ((np.dtype(np.int8),) if v3 else ()), (C, dim)),
        "doclens": ((i32,), (N,)),
        "ivf_offsets": ((i64,), (C + 1,)),
    }
    if int8_centroids:
        specs["centroid_scales"] = ((np.dtype(np.float32),), (C,))
    ivf = m.arrays.get("ivf")
    ivf_dtypes = (u16, i32) if v3 and N <= UINT16_DOCUMENTS else (i32,)
    specs["ivf"] = (ivf_dtypes, ivf.shape if ivf is not None and len(ivf.shape) == 1 else (-1,))
    for s in m.segments:
        specs[f"{s.name}_codes"] = (code_dtypes, (s.num_tokens,))
        specs[f"{s.name}_residuals"] = ((u8,), (s.num_tokens, m.code_bytes))
        if m.normalized:
            specs[f"{s.name}_norms"] = ((u8 if v3 else np.dtype(np.float16),), (s.num_tokens,))
    if m.normalized and v3:
        specs["norm_values"] = ((np.dtype(np.float32),), (NORM_LEVELS,))
    for name in m.tombstones:
        e = m.arrays.get(name)
        specs[name] = ((i64,), e.shape if e is not None and len(e.shape) == 1 else (-1,))
    for name, (dt, shape) in codec_array_specs(dim, dict(m.codec)).items():
        specs[name] = ((dt,), shape)
    if m.has_doc_ids:
        blob = m.arrays.get("doc_ids_utf8")
        specs["doc_ids_utf8"] = ((np.dtype(np.uint8),), blob.shape if blob is not None and len(blob.shape) == 1
                                 else (-1,))
        specs["doc_ids_offsets"] = ((i64,), (N + 1,))
    return specs


def _search(raw: dict, f: _Fields, where: str) -> Optional[Mapping[str, Any]]:
    """The ``search`` field: null (or absent: indexes written before it) for the default search
    depth, else ``{"depth": an integer in [1, MAX_SEARCH_DEPTH]}``."""
    p = _optional_object(raw, f, where, "search", ("depth",))
    if p is None:
        return None
    return MappingProxyType({"depth": p.int("depth", 1, MAX_SEARCH_DEPTH)})


def parse_manifest(raw: Any, where: str) -> Manifest:
    """Check a decoded ``manifest.json`` and return it typed.

    Raises :class:`FormatVersionError` for another format version, :class:`IndexCorruptError`
    naming the field for anything missing, mistyped, out of range or inconsistent.
    """
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        raise IndexCorruptError(f"{where} is not a plaid index manifest")
    version = raw.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        if type(version) is int and version > FORMAT_VERSION:
            hint = "it was written by a newer plaid; upgrade plaid-engine to read it"
        else:
            hint = "rebuild the index with this version of plaid"
        raise FormatVersionError(f"{where}: index format version {version!r} is not supported (this plaid reads "
                                 f"versions {', '.join(map(str, READABLE_VERSIONS))}); {hint}")
    f = _Fields(raw, where)
    generation = f.int("generation")
    dim = f.int("dim", 1, 1 << 20)
    N = f.int("num_documents")
    T = f.int("num_tokens")
    C = f.int("num_centroids", 1, 1 << 31)
    num_empty = f.int("num_empty_documents", 0, N)
    num_deleted = f.int("num_deleted", 0, N)
    has_doc_ids = f.bool("has_doc_ids")
    normalized = f.bool("normalized")
    outlier = raw.get("outlier_residual_norm")
    if outlier is not None:
        if type(outlier) not in (int, float) or not np.isfinite(outlier) or outlier < 0:
            raise f.bad("outlier_residual_norm", f"must be a finite non-negative number or null, got {outlier!r:.40}")
        outlier = float(outlier)
    try:
        codec = check_codec_params(dim, f.get("codec"))
    except ValueError as e:
        raise IndexCorruptError(f"{where}: manifest field {e}") from None
    next_segment = f.int("next_segment")
    segments = []
    pos = 0
    tokens = 0
    seen = set()
    for i, s in enumerate(f.list("segments")):
        sf = _Fields(s, where, f"segments[{i}].")
        name = sf.str("name")
        m = SEGMENT_RE.match(name)
        if not m:
            raise sf.bad("name", f"= {name!r:.40} is not of the form seg<number>")
        if name in seen:
            raise sf.bad("name", f"= {name!r} is used by two segments")
        if int(m.group(1)) >= next_segment:
            raise sf.bad("name", f"= {name!r} is not below next_segment={next_segment}")
        seen.add(name)
        start, end = sf.int("doc_start"), sf.int("doc_end")
        if start != pos or end < start or end > N:
            raise sf.bad("doc_start", f"/doc_end ({start}, {end}) do not continue the previous segment "
                                      f"(documents {pos}..{N})")
        nt = sf.int("num_tokens")
        segments.append(Segment(name, start, end, nt))
        pos, tokens = end, tokens + nt
    if pos != N:
        raise f.bad("segments", f"cover documents 0..{pos}, not the {N} documents")
    if tokens != T:
        raise f.bad("segments", f"hold {tokens} tokens, not num_tokens={T}")
    tombstones = []
    for i, t in enumerate(f.list("tombstones")):
        if not isinstance(t, str) or not TOMBSTONE_RE.match(t) or t in tombstones:
            raise f.bad(f"tombstones[{i}]", f"= {t!r:.40} is not a distinct tombstones_g<number> array name")
        tombstones.append(t)
    build = raw.get("build", {})
    if not isinstance(build, dict):
        raise f.bad("build", "must be a JSON object")
    if "seed" in build:  # read back by add() (the other build fields are informational)
        _Fields(build, where, "build.").int("seed", 0, (1 << 32) - 1)
    pooling = _pooling(raw, f, where)
    search = _search(raw, f, where)
    arrays_raw = f.get("arrays")
    if not isinstance(arrays_raw, dict):
        raise f.bad("arrays", "must be a JSON object")
    arrays = {}
    files = set()
    for name, e in arrays_raw.items():
        if not ARRAY_NAME_RE.match(name):
            raise f.bad("arrays", f"has an entry with a bad array name {name!r:.40}")
        entry = _entry(name, e, generation, where)
        if entry.file in files:
            raise f.bad(f"arrays.{name}.file", f"= {entry.file!r} is listed twice")
        files.add(entry.file)
        arrays[name] = entry
    man = Manifest(generation=generation, dim=dim, num_documents=N, num_tokens=T, num_centroids=C,
                   num_empty_documents=num_empty, num_deleted=num_deleted, has_doc_ids=has_doc_ids,
                   normalized=normalized, outlier_residual_norm=outlier, codec=MappingProxyType(codec),
                   segments=tuple(segments), next_segment=next_segment, tombstones=tuple(tombstones),
                   arrays=MappingProxyType(arrays), created_by=f.str("created_by", ""),
                   build=MappingProxyType(build), pooling=pooling, search=search,
                   format_version=version)
    specs = array_specs(man)
    for name, (dtypes, shape) in specs.items():
        e = arrays.get(name)
        if e is None:
            raise IndexCorruptError(f"{where}: the manifest lists no array {name!r}")
        if e.dtype not in dtypes:
            raise IndexCorruptError(f"{where}: manifest field arrays.{name}.dtype = {e.dtype.str} (expected "
                                    f"{' or '.join(d.str for d in dtypes)})")
        if -1 not in shape and e.shape != tuple(shape):
            raise IndexCorruptError(f"{where}: manifest field arrays.{name}.shape = {list(e.shape)} "
                                    f"(expected {list(shape)})")
        if -1 in shape and len(e.shape) != len(shape):
            raise IndexCorruptError(f"{where}: manifest field arrays.{name}.shape = {list(e.shape)} has the wrong rank")
    extra = sorted(set(arrays) - set(specs))
    if extra:
        raise IndexCorruptError(f"{where}: the manifest lists arrays this index has no use for: {', '.join(extra[:5])}")
    return man


def dumps(m: Manifest) -> bytes:
    """The bytes of ``manifest.json`` for ``m``."""
    return (json.dumps(m.to_json(), indent=1) + "\n").encode("utf-8")
