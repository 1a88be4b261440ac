"""External document ids: stored as data (UTF-8 blob + offsets), checked, and resolved in one place."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

from ..errors import IndexCorruptError, InvalidInputError

__all__ = ["DocIdTable", "check_doc_ids", "encode_doc_ids", "resolve_ids"]


def check_doc_ids(doc_ids, n: int, existing: Optional[Iterable[str]] = None) -> Optional[List[str]]:
    """Validate external ids: None, or ``n`` unique non-empty strings (ints are converted).

    ``existing``: live ids already in the index, which new ones must not repeat. Returns a list
    or None; raises :class:`InvalidInputError` naming the problem.
    """
    if doc_ids is None:
        return None
    if isinstance(doc_ids, (str, bytes)):
        raise InvalidInputError("doc_ids must be a sequence of strings, not a single string")
    try:
        names = [str(x) if isinstance(x, (int, np.integer)) and not isinstance(x, bool) else x for x in doc_ids]
    except TypeError:
        raise InvalidInputError(f"doc_ids must be a sequence of strings, got {type(doc_ids).__name__}") from None
    if len(names) != n:
        raise InvalidInputError(f"doc_ids has {len(names)} entries for {n} documents")
    for i, x in enumerate(names):
        if not isinstance(x, str) or not x:
            raise InvalidInputError(f"doc_ids[{i}] must be a non-empty string, got {x!r}")
        try:
            x.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(f"doc_ids[{i}] = {x!r} cannot be encoded as UTF-8") from None
    if len(set(names)) != n:
        seen, dups = set(), []
        for x in names:
            if x in seen and x not in dups:
                dups.append(x)
            seen.add(x)
        raise InvalidInputError(f"doc_ids are not unique: {len(dups)} duplicated, e.g. {dups[:3]}")
    if existing is not None:
        live = existing if isinstance(existing, (set, frozenset, dict)) else set(existing)
        clash = [x for x in names if x in live]
        if clash:
            raise InvalidInputError(f"{len(clash)} doc_ids are already in the index, e.g. {clash[:3]}")
    return names


def encode_doc_ids(names: List[str]) -> Tuple[np.ndarray, np.ndarray]:
    """UTF-8 bytes of all ids concatenated (uint8 [B]) and their offsets (int64 [n + 1])."""
    encoded = [x.encode("utf-8") for x in names]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(), offsets


class DocIdTable:
    """External ids stored as a UTF-8 blob + offsets (memory-mapped or in memory), decoded on demand.

    blob: uint8 [B]; offsets: int64 [n + 1], checked at construction (start 0, non-decreasing,
    end B). ``table[i]`` -> str; ``table.lookup(name)`` -> internal id or -1 (the reverse map is
    built on first use; with duplicates, e.g. an id deleted then added again, the latest wins).
    """

    def __init__(self, blob: np.ndarray, offsets: np.ndarray, where: str = "doc_ids",
                 deleted: Optional[np.ndarray] = None):
        offsets = np.asarray(offsets)
        if len(offsets) == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != len(blob) \
                or (len(offsets) > 1 and bool((np.diff(offsets) < 0).any())):
            raise IndexCorruptError(f"{where}: doc_ids_offsets do not delimit doc_ids_utf8")
        self.blob = blob
        self.offsets = offsets
        self.where = where
        self.deleted = np.zeros(0, np.int64) if deleted is None else np.asarray(deleted, np.int64)
        self._reverse: Optional[Dict[str, int]] = None
        self._list: Optional[List[str]] = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _decode(self, raw: bytes, i: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise IndexCorruptError(f"{self.where}: doc_ids_utf8 holds an invalid UTF-8 id at document {i}") from None

    def __getitem__(self, i: int) -> str:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._decode(bytes(self.blob[self.offsets[i] : self.offsets[i + 1]]), i)

    def tolist(self) -> List[str]:
        """Every id, decoded (cached)."""
        if self._list is None:
            raw = np.asarray(self.blob).tobytes()
            offs = self.offsets.tolist()
            self._list = [self._decode(raw[offs[i] : offs[i + 1]], i) for i in range(len(offs) - 1)]
        return self._list

    def validate(self) -> None:
        """Decode every id and check that no two live documents share one (an id may repeat only
        where all but its last use were deleted). Raises :class:`IndexCorruptError`; done once."""
        if self._reverse is not None:
            return
        names = self.tolist()
        reverse = {n: i for i, n in enumerate(names)}  # the latest use of each id wins
        if len(reverse) < len(names):
            dead = np.zeros(len(names), bool)
            dead[self.deleted[self.deleted < len(names)]] = True
            for i, n in enumerate(names):
                if not dead[i] and reverse[n] != i:
                    raise IndexCorruptError(f"{self.where}: documents {i} and {reverse[n]} share the id {n!r} "
                                            "and neither is deleted")
        self._reverse = reverse

    def lookup(self, name: str) -> int:
        """Internal id of external id ``name`` (its latest use), or -1."""
        self.validate()
        return self._reverse.get(name, -1)


def resolve_ids(ids, num_documents: int, table: Optional[DocIdTable], deleted: np.ndarray, *,
                what: str = "ids", deleted_ok: bool = False) -> np.ndarray:
    """Internal ids (int64 [n], input order) of documents named by external (str) or internal (int) ids.

    Unknown ids raise :class:`InvalidInputError` listing a few; deleted ones raise too unless
    ``deleted_ok`` (then they are kept: the caller filters them). ``deleted``: sorted int64.
    """
    if isinstance(ids, (str, bytes, int, np.integer)):
        ids = [ids]
    try:
        ids = list(ids.tolist() if isinstance(ids, np.ndarray) else ids)
    except TypeError:
        raise InvalidInputError(f"{what} must be an id or a sequence of ids, got {type(ids).__name__}") from None
    out = np.empty(len(ids), np.int64)
    unknown = []
    for i, x in enumerate(ids):
        if isinstance(x, str):
            if table is None:
                raise InvalidInputError(f"{what}: this index has no external doc_ids; use internal (int) ids")
            j = table.lookup(x)
        elif isinstance(x, (int, np.integer)) and not isinstance(x, bool):
            j = int(x) if 0 <= int(x) < num_documents else -1
        else:
            raise InvalidInputError(f"{what}: document ids must be str (external) or int (internal), got {x!r}")
        if j < 0:
            unknown.append(x)
        out[i] = j
    if not deleted_ok and len(deleted) and len(out):
        gone = np.isin(out, deleted)
        unknown += [ids[i] for i in np.flatnonzero(gone & (out >= 0))]
    if unknown:
        kind = "unknown" if deleted_ok else "unknown or deleted"
        raise InvalidInputError(f"{what}: {len(unknown)} {kind} document id(s), e.g. {unknown[:5]}")
    return out
