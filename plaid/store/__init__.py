"""The index folder: the only code that knows its files.

* :mod:`~plaid.store.files` — safe primitives: plain names, regular files only, no links followed,
  exclusive creation, space allocated before a memory map is written;
* :mod:`~plaid.store.manifest` — format name and version, file naming, the typed manifest;
* :mod:`~plaid.store.snapshot` — one committed generation, read-only and checked; ``verify``;
* :mod:`~plaid.store.writer` — the writer lock, the journal, atomic commit and cleanup;
* :mod:`~plaid.store.doc_ids` — external ids stored as data, and the one id resolver;
* :mod:`~plaid.store.upgrade` — an older format version converted in place.

Indexing and search both stand on this layer; neither builds a path inside an index folder.
"""
from .doc_ids import DocIdTable, check_doc_ids, encode_doc_ids, resolve_ids
from .manifest import FORMAT_NAME, FORMAT_VERSION, MANIFEST, MAX_SEARCH_DEPTH, ArrayEntry, Manifest, Segment, check_search_depth
from .snapshot import (SegmentedRows, Snapshot, checked_codes, checked_norms, open_snapshot, read_manifest,
                       verify)
from .files import fsync_dir
from .writer import JOURNAL, LOCK_FILE, IndexWriter, is_own_name, writer_lock, writing
from .upgrade import upgrade

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MANIFEST", "MAX_SEARCH_DEPTH", "check_search_depth", "LOCK_FILE", "JOURNAL", "ArrayEntry", "Manifest", "Segment",
           "Snapshot", "SegmentedRows", "IndexWriter", "DocIdTable", "open_snapshot", "read_manifest", "verify",
           "writing", "writer_lock", "checked_codes", "checked_norms", "check_doc_ids", "encode_doc_ids",
           "resolve_ids", "fsync_dir", "is_own_name", "upgrade"]
