"""One committed generation of an index, read-only: the manifest, every array file mapped, checked.

:func:`open_snapshot` reads ``manifest.json`` (strictly: :mod:`plaid.store.manifest`), opens
every file it lists through :func:`plaid.store.files.read_npy` (regular files only, dtype, shape
and size checked against the manifest and against the counts) and memory-maps it. The maps stay
valid after a writer replaces the generation and removes its files, so a snapshot is
self-consistent for as long as it is held. A writer's commit racing with the open is retried.

Arrays that callers load into memory anyway are checked once, when first used (cheap, linear in
their size): centroids finite, inverted-file ids below N, offsets non-decreasing and delimiting,
document lengths non-negative and summing to ``num_tokens``, tombstones in range, codec tables
finite. Per-token arrays (centroid ids, norms) stay on disk; :func:`checked_codes` and
:func:`checked_norms` check the rows a caller gathers, and :func:`verify` checks all of them.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..codecs import NormQuantizer, ResidualCodec, codec_from_manifest, codec_array_specs, dequantize_centroids
from ..errors import IndexCorruptError, IndexNotFoundError
from . import files
from .doc_ids import DocIdTable
from .manifest import ARRAY_FILE_RE, MANIFEST, Manifest, parse_manifest

__all__ = ["read_manifest", "Snapshot", "open_snapshot", "SegmentedRows", "checked_codes", "checked_norms",
           "verify", "MANIFEST_MAX_BYTES"]

#: A manifest larger than this is refused unread (real ones are kilobytes).
MANIFEST_MAX_BYTES = 64 << 20
#: Rows per block when :func:`verify` scans per-token arrays.
VERIFY_BLOCK_ROWS = 1 << 22
#: Attempts to open a generation while writers keep committing new ones.
OPEN_ATTEMPTS = 5
#: Largest magnitude a (dequantized) centroid value may have: far beyond any embedding's, and small
#: enough that a query token's product with a centroid stays a finite float32 (a re-signed index
#: with scales near float32's largest would otherwise give infinite or NaN scores).
MAX_CENTROID_VALUE = 1e18


def read_manifest(path: str) -> Manifest:
    """Read and check ``manifest.json`` of the index at ``path``.

    Raises :class:`IndexNotFoundError` (no directory, or no committed index in it),
    :class:`IndexCorruptError` (unreadable, not a regular file, invalid JSON, a bad field) or
    :class:`FormatVersionError`.
    """
    if not os.path.isdir(path):
        raise IndexNotFoundError(f"no index at {path}: the directory does not exist")
    mpath = os.path.join(path, MANIFEST)
    if not os.path.lexists(mpath):
        try:
            entries = os.listdir(path)
        except OSError as e:
            raise IndexNotFoundError(f"{path}: cannot list the directory ({e.strerror})") from None
        if any(ARRAY_FILE_RE.match(e) for e in entries):
            raise IndexNotFoundError(
                f"{path} holds an incomplete index: no {MANIFEST} (was the build interrupted?); rebuild it")
        raise IndexNotFoundError(f"{path} is not a plaid index: no {MANIFEST}")
    fd = files.open_regular(path, MANIFEST)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MANIFEST_MAX_BYTES + 1)
    if len(data) > MANIFEST_MAX_BYTES:
        raise IndexCorruptError(f"{mpath} is larger than {MANIFEST_MAX_BYTES} bytes: not a plaid manifest")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexCorruptError(f"{mpath} is not valid JSON ({str(e)[:200]})") from None
    return parse_manifest(raw, mpath)


class SegmentedRows:
    """Per-token rows stored as consecutive segments, addressed by global token position.

    parts: arrays [t_i, ...] (memory-mapped or in memory), in segment order. :meth:`take`
    gathers rows at ascending global positions (int64 [n]) into one array [n, ...].
    """

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = list(parts)
        self.bases = np.concatenate([[0], np.cumsum([len(p) for p in self.parts])]).astype(np.int64)
        self.dtype = np.result_type(*[p.dtype for p in self.parts]) if self.parts else np.dtype(np.uint8)

    def __len__(self) -> int:
        return int(self.bases[-1])

    def take(self, pos: np.ndarray, out: Optional[np.ndarray] = None) -> np.ndarray:
        if len(self.parts) == 1:
            return np.take(self.parts[0], pos, axis=0, out=out)
        if out is None:
            tail = self.parts[0].shape[1:] if self.parts else ()
            out = np.empty((len(pos),) + tail, self.dtype)
        cuts = np.searchsorted(pos, self.bases)
        for i, part in enumerate(self.parts):
            lo, hi = cuts[i], cuts[i + 1]
            if hi > lo:
                out[lo:hi] = np.take(part, pos[lo:hi] - self.bases[i], axis=0)
        return out

    __getitem__ = take

    def concatenated(self) -> np.ndarray:
        """All rows in one in-memory array."""
        if len(self.parts) == 1:
            return np.array(self.parts[0])
        return np.concatenate([np.asarray(p, dtype=self.dtype) for p in self.parts])


def checked_codes(codes: np.ndarray, num_centroids: int, what: str) -> np.ndarray:
    """``codes`` (centroid ids, uint16/int32) if all lie in ``[0, num_centroids)``, else
    :class:`IndexCorruptError` naming ``what`` (the array's file)."""
    if len(codes):
        lo, hi = int(codes.min()), int(codes.max())
        if lo < 0 or hi >= num_centroids:
            raise IndexCorruptError(f"{what}: centroid ids out of range ([{lo}, {hi}] for {num_centroids} centroids)")
    return codes


def checked_norms(norms: np.ndarray, what: str) -> np.ndarray:
    """``norms`` (float16) if all are finite and positive, else :class:`IndexCorruptError`."""
    if len(norms) and not (np.isfinite(norms).all() and (norms > 0).all()):
        raise IndexCorruptError(f"{what}: token norms that are NaN, infinite, zero or negative")
    return norms


class Snapshot:
    """One committed generation of the index at ``path``: typed manifest and mapped arrays.

    Use :func:`open_snapshot`. Properties load (once) and check the arrays held in memory:
    ``centroids`` float32 [C, dim], ``ivf`` int32 [P] (whatever its stored width),
    ``norm_quantizer`` (the values of one-byte norms), ``ivf_offsets`` int64 [C + 1],
    ``doclens`` int64 [N], ``doc_offsets`` int64 [N + 1], ``deleted`` int64 sorted ids,
    ``codec``, ``doc_ids`` (:class:`DocIdTable` or None). Per-token arrays: :meth:`codes`,
    :meth:`residuals`, :meth:`norms` (memory-mapped unless ``load=True``).
    """

    def __init__(self, path: str, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self._maps: Dict[str, np.ndarray] = {}
        for name, e in manifest.arrays.items():
            self._maps[name] = files.read_npy(path, e.file, [e.dtype], e.shape, e.bytes, mmap_mode=True)
        self._cache: Dict[str, object] = {}

    # -- plain facts ---------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        return self.manifest.generation

    def nbytes(self) -> int:
        """Bytes of every committed array file plus the manifest."""
        total = sum(e.bytes for e in self.manifest.arrays.values())
        try:
            total += os.stat(os.path.join(self.path, MANIFEST), follow_symlinks=False).st_size
        except OSError:
            pass
        return total

    def file(self, name: str) -> str:
        """The file name of array ``name`` (for messages)."""
        return self.manifest.arrays[name].file

    def mapped(self, name: str) -> np.ndarray:
        """Array ``name`` as mapped (read-only, unchecked values)."""
        try:
            return self._maps[name]
        except KeyError:
            raise IndexCorruptError(f"{self.path}: the manifest lists no array {name!r}") from None

    def release(self, name: str) -> None:
        """Drop this snapshot's memory map of array ``name`` (after loading it elsewhere)."""
        self._maps.pop(name, None)

    def forget(self, name: str) -> None:
        """Drop this snapshot's checked copy of array ``name`` (a holder keeping its own form of
        it: the CPU engine's 16-bit inverted file); asking for it again reads and checks it again."""
        self._cache.pop(name, None)

    def loaded(self, name: str) -> np.ndarray:
        """Array ``name`` read into memory (a private copy). The map's pages are then dropped from
        the resident set: a searcher holding the inverted file would otherwise count it twice."""
        mapped = self.mapped(name)
        out = np.array(mapped)
        files.drop_resident(mapped)
        return out

    def _bad(self, name: str, why: str) -> IndexCorruptError:
        return IndexCorruptError(f"{self.path}: index file {self.file(name)}: {why}")

    def _cached(self, key, make):
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = make()
        return v

    # -- arrays held in memory, checked once -------------------------------------------------------
    @property
    def centroids(self) -> np.ndarray:
        """float32 [C, dim], dequantized when stored as int8 with ``centroid_scales``."""
        def make():
            raw = self.mapped("centroids")
            if raw.dtype == np.int8:
                scales = self.loaded("centroid_scales")
                if not (np.isfinite(scales).all() and (scales >= 0).all()):
                    raise self._bad("centroid_scales", "scales that are NaN, infinite or negative")
                c = dequantize_centroids(raw, scales)
            else:
                c = np.array(raw, dtype=np.float32)
            if not np.isfinite(c).all():
                raise self._bad("centroids", "centroids that are NaN or infinite")
            big = float(np.abs(c).max()) if c.size else 0.0
            if big > MAX_CENTROID_VALUE:
                raise self._bad("centroid_scales" if raw.dtype == np.int8 else "centroids",
                                f"centroid values up to {big:.3g}, beyond {MAX_CENTROID_VALUE:.0e} (search scores "
                                "would overflow)")
            return c
        return self._cached("centroids", make)

    @property
    def centroid_storage(self) -> str:
        """How the centroids are stored: ``"int8"`` (with scales), ``"float16"`` or ``"float32"``."""
        return str(self.manifest.arrays["centroids"].dtype)

    @property
    def norm_quantizer(self) -> Optional[NormQuantizer]:
        """The table of the one-byte token norms (format 3, renormalising indexes), else None."""
        if not self.manifest.normalized or self.manifest.format_version < 3:
            return None

        def make():
            try:
                return NormQuantizer(self.loaded("norm_values"))
            except ValueError as e:
                raise self._bad("norm_values", str(e)) from None
        return self._cached("norm_quantizer", make)

    @property
    def ivf_offsets(self) -> np.ndarray:
        def make():
            o = self.loaded("ivf_offsets").astype(np.int64)
            P = self.manifest.arrays["ivf"].shape[0]
            if int(o[0]) != 0 or int(o[-1]) != P or bool((np.diff(o) < 0).any()):
                raise self._bad("ivf_offsets", f"offsets that do not delimit the {P} entries of ivf")
            return o
        return self._cached("ivf_offsets", make)

    @property
    def ivf(self) -> np.ndarray:
        def make():
            v = self.loaded("ivf").astype(np.int32, copy=False)  # uint16 on disk for small indexes
            if len(v) and (int(v.min()) < 0 or int(v.max()) >= self.manifest.num_documents):
                raise self._bad("ivf", f"document ids outside [0, {self.manifest.num_documents})")
            if len(v) and not (self.doclens[v] > 0).all():
                raise self._bad("ivf", "documents without tokens listed under a centroid")
            return v
        return self._cached("ivf", make)

    @property
    def doclens(self) -> np.ndarray:
        def make():
            d = self.loaded("doclens").astype(np.int64)
            if len(d) and int(d.min()) < 0:
                raise self._bad("doclens", "negative document lengths")
            if int(d.sum()) != self.manifest.num_tokens:
                raise self._bad("doclens", f"lengths summing to {int(d.sum())}, not num_tokens={self.manifest.num_tokens}")
            for s in self.manifest.segments:
                if int(d[s.doc_start : s.doc_end].sum()) != s.num_tokens:
                    raise self._bad("doclens", f"lengths of segment {s.name} that do not sum to its {s.num_tokens} tokens")
            return d
        return self._cached("doclens", make)

    @property
    def doc_offsets(self) -> np.ndarray:
        def make():
            o = np.zeros(self.manifest.num_documents + 1, np.int64)
            np.cumsum(self.doclens, out=o[1:])
            return o
        return self._cached("doc_offsets", make)

    @property
    def deleted(self) -> np.ndarray:
        """Sorted internal ids of deleted documents (the union of the tombstone arrays), int64."""
        def make():
            parts = []
            for name in self.manifest.tombstones:
                t = self.loaded(name).astype(np.int64)
                if len(t) and (int(t.min()) < 0 or int(t.max()) >= self.manifest.num_documents):
                    raise self._bad(name, f"deleted ids outside [0, {self.manifest.num_documents})")
                parts.append(t)
            d = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
            if len(d) != self.manifest.num_deleted:
                raise IndexCorruptError(f"{self.path}: manifest field num_deleted = {self.manifest.num_deleted}, but "
                                        f"the tombstones name {len(d)} deleted documents")
            return d
        return self._cached("deleted", make)

    @property
    def codec(self) -> ResidualCodec:
        def make():
            m = self.manifest
            arrays = {}
            for name in codec_array_specs(m.dim, dict(m.codec)):
                a = np.asarray(self.loaded(name), dtype=np.float32)
                if not np.isfinite(a).all():
                    raise self._bad(name, "codec values that are NaN or infinite")
                arrays[name] = a
            try:
                return codec_from_manifest(m.dim, dict(m.codec), arrays)
            except (ValueError, KeyError) as e:
                raise IndexCorruptError(f"{self.path}: codec arrays are inconsistent ({e})") from None
        return self._cached("codec", make)

    @property
    def doc_ids(self) -> Optional[DocIdTable]:
        if not self.manifest.has_doc_ids:
            return None
        return self._cached("doc_ids", lambda: DocIdTable(
            self.mapped("doc_ids_utf8"), self.loaded("doc_ids_offsets"),
            where=f"{self.path}: index file {self.file('doc_ids_utf8')}", deleted=self.deleted))

    @property
    def num_live(self) -> int:
        """Documents that a search can return: not deleted and not empty."""
        def make():
            live = self.doclens > 0
            live[self.deleted] = False
            return int(live.sum())
        return self._cached("num_live", make)

    # -- per-token arrays ------------------------------------------------------------------------
    def _rows(self, suffix: str, load: bool) -> SegmentedRows:
        names = [f"{s.name}_{suffix}" for s in self.manifest.segments]
        parts = [self.loaded(n) if load else self.mapped(n) for n in names]
        if load:  # in memory now: do not keep the files mapped as well
            for n in names:
                self.release(n)
        return SegmentedRows(parts)

    def codes(self, load: bool = False) -> SegmentedRows:
        """Centroid id of every token (uint16/int32), in global token order."""
        return self._rows("codes", load)

    def residuals(self, load: bool = False) -> SegmentedRows:
        """Residual codes of every token, uint8 [T, code_bytes]."""
        return self._rows("residuals", load)

    def norms(self, load: bool = False) -> Optional[SegmentedRows]:
        """Norm of every decoded token, when the index renormalises (else None): uint8 codes into
        :attr:`norm_quantizer`'s values (format 3) or float16 values (format 2)."""
        return self._rows("norms", load) if self.manifest.normalized else None

    def token_files(self, suffix: str) -> str:
        """The files of one per-token array, for messages: ``seg0_codes.0.npy, ...``."""
        return ", ".join(self.file(f"{s.name}_{suffix}") for s in self.manifest.segments)

    def check_structure(self) -> None:
        """Load and check every in-memory array (raises :class:`IndexCorruptError`)."""
        self.centroids, self.ivf_offsets, self.ivf, self.doclens, self.deleted, self.codec, self.doc_ids
        self.norm_quantizer
        if self.doc_ids is not None:
            self.doc_ids.validate()

    def check_tokens(self) -> None:
        """Check every per-token value on disk: centroid ids below C, float16 norms (format 2) finite
        and positive (a one-byte norm is valid whatever its value)."""
        m = self.manifest
        float_norms = m.normalized and m.format_version < 3
        for s in m.segments:
            for suffix in ("codes", "norms") if float_norms else ("codes",):
                name = f"{s.name}_{suffix}"
                a = self.mapped(name)
                for lo in range(0, len(a), VERIFY_BLOCK_ROWS):
                    block = np.asarray(a[lo : lo + VERIFY_BLOCK_ROWS])
                    what = f"{self.path}: index file {self.file(name)}"
                    if suffix == "codes":
                        checked_codes(block, m.num_centroids, what)
                    else:
                        checked_norms(block, what)


def open_snapshot(path: str) -> Snapshot:
    """The committed generation of the index at ``path``, opened; retried when a writer commits
    a new generation (and removes the files of the old one) while it is being opened."""
    for attempt in range(OPEN_ATTEMPTS):
        m = read_manifest(path)
        try:
            return Snapshot(path, m)
        except IndexCorruptError:
            if attempt == OPEN_ATTEMPTS - 1 or read_manifest(path).generation == m.generation:
                raise  # really damaged, not a concurrent commit
    raise AssertionError("unreachable")


def verify(path: str) -> List[str]:
    """Every problem found in the index at ``path``: one line each, naming the file.

    Checks each listed file's type, size and CRC-32, then (when those are intact) every value
    the engine relies on: the in-memory arrays' structure and each token's centroid id and norm.
    Returns an empty list when the index is intact. Raises for an unreadable manifest.
    """
    m = read_manifest(path)
    problems = []
    for name, e in m.arrays.items():
        if not os.path.lexists(os.path.join(path, e.file)):
            problems.append(f"{e.file}: missing")
            continue
        try:
            fd = files.open_regular(path, e.file)
        except IndexCorruptError as err:
            problems.append(f"{e.file}: {str(err).replace(f'{path}: index file {e.file} ', '')}")
            continue
        try:
            size = os.fstat(fd).st_size
            if size != e.bytes:
                problems.append(f"{e.file}: size {size} bytes, expected {e.bytes}")
            elif files.file_crc32(fd) != e.crc32:
                problems.append(f"{e.file}: checksum mismatch (the file was altered or corrupted)")
        finally:
            os.close(fd)
    if problems:
        return problems
    try:
        snap = Snapshot(path, m)
        snap.check_structure()
        snap.check_tokens()
    except IndexCorruptError as err:
        msg = str(err)
        problems.append(msg[len(path) + 2:] if msg.startswith(path + ": ") else msg)
    return problems
