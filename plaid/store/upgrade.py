"""Converting an index of an older format version to the current one, in place and atomically.

Format 2 -> 3: the float16 token norms become one-byte codes into a table of 256 values
(:class:`plaid.codecs.NormQuantizer`, spanning the index's own norms). Everything else of a
format-2 index is valid format 3 as it is (float16 centroids, an int32 inverted file, PQ codecs
without rotation), so only the norms are rewritten: 1 byte per token is read twice and written
once. Readers keep searching the old generation until the manifest switches.
"""
from __future__ import annotations

import logging
import os

import numpy as np

from ..codecs import NormQuantizer
from ..errors import IndexCorruptError
from .manifest import FORMAT_VERSION
from .snapshot import checked_norms, read_manifest
from .writer import writing

__all__ = ["upgrade"]

logger = logging.getLogger(__name__)

#: Tokens read per step (bounds memory whatever the index size).
UPGRADE_BLOCK = 1 << 22


def upgrade(path) -> bool:
    """Convert the index at ``path`` to the current format version, in place; returns whether
    anything changed (False: already current). Atomic like every write: a reader or a killed
    process sees the old index or the new one. Raises :class:`IndexCorruptError` for a damaged
    index (a norm that is NaN, infinite or not positive) and leaves it untouched."""
    path = os.fspath(getattr(path, "path", path))
    if read_manifest(path).format_version == FORMAT_VERSION:
        return False
    with writing(path, upgrade=True) as w:
        snap = w.snapshot
        m = snap.manifest
        if m.format_version == FORMAT_VERSION:  # upgraded by another process meanwhile
            return False
        fields = m.fields()
        if m.normalized:
            norms = snap.norms()
            what = f"{path}: index files {snap.token_files('norms')}"
            lo, hi = np.inf, 0.0
            for part in norms.parts:
                for a in range(0, len(part), UPGRADE_BLOCK):
                    block = checked_norms(np.asarray(part[a : a + UPGRADE_BLOCK]), what).astype(np.float32)
                    if len(block):
                        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
            nq = NormQuantizer.fit(np.array([lo, hi]) if hi > 0 else np.ones(1))
            w.write("norm_values", nq.values)
            for s, part in zip(m.segments, norms.parts):
                name = f"{s.name}_norms"
                out = w.create(name, (len(part),), np.uint8)
                for a in range(0, len(part), UPGRADE_BLOCK):
                    out[a : a + UPGRADE_BLOCK] = nq.encode(np.asarray(part[a : a + UPGRADE_BLOCK], np.float32))
                w.finish(name)
                fields["arrays"].pop(name)
        elif m.format_version > FORMAT_VERSION:
            raise IndexCorruptError(f"{path}: format version {m.format_version} is newer than this plaid")
        w.commit(fields)
    logger.info("upgraded %s from format version %d to %d", path, m.format_version, FORMAT_VERSION)
    return True
