"""Integrity: truncated, altered and missing index files are detected and named."""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

import plaid
from plaid import store

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lifecycle_crash_child as child  # noqa: E402
from lifecycle_util import copy_index  # noqa: E402

SEED = 5


@pytest.fixture(scope="module")
def living_index(tmp_path_factory):
    """A small index with two segments (build + add), external ids and a tombstone file."""
    path = str(tmp_path_factory.mktemp("integrity") / "index")
    child.build(path, SEED)
    index = plaid.Index(path)
    names = [f"g1-{i}" for i in range(20)]
    index.add([child.doc_vectors(SEED, x) for x in names], doc_ids=names, show_progress=False)
    index.delete(["g0-3", "g1-4", 17])
    assert {"seg0_codes", "seg1_codes", "tombstones_g2"} <= set(index.manifest["arrays"])
    return path


ARRAYS = ["seg0_codes", "seg0_residuals", "seg1_codes", "seg1_residuals", "centroids", "pq_codebooks", "ivf",
          "ivf_offsets", "doclens", "doc_ids_utf8", "doc_ids_offsets", "tombstones_g2"]


def _file(path, name):
    entry = plaid.Index(path).manifest["arrays"][name]
    return entry["file"], os.path.join(path, entry["file"])


def _query():
    return child.doc_vectors(SEED, "g0-7")[:5]


@pytest.mark.parametrize("name", ARRAYS)
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_array_file_is_detected_and_named(tmp_path, living_index, name, damage):
    path = copy_index(living_index, str(tmp_path / "index"))
    fname, full = _file(path, name)
    size = os.path.getsize(full)
    if damage == "truncate":
        os.truncate(full, size - max(1, (size - 128) // 2))
    else:  # flip one byte in the middle of the data (after the .npy header)
        data_start = np.load(full, mmap_mode="r").offset
        at = data_start + (size - data_start) // 2
        with open(full, "r+b") as f:
            f.seek(at)
            b = f.read(1)
            f.seek(at)
            f.write(bytes([b[0] ^ 0x5A]))

    problems = plaid.Index(path).verify()
    assert problems == store.verify(path)
    assert len(problems) == 1 and problems[0].startswith(fname + ":"), problems
    assert ("checksum" if damage == "flip" else "size") in problems[0]

    with pytest.raises(plaid.IndexCorruptError, match=fname.replace(".", r"\.")):
        plaid.Searcher(path, verify=True)
    if damage == "truncate":
        # the size recorded in the manifest catches truncation even without verify=True
        with pytest.raises(plaid.IndexCorruptError, match=fname.replace(".", r"\.")):
            plaid.Searcher(path).search(_query(), k=3)


def test_missing_segment_file_fails_with_a_clear_error(tmp_path, living_index):
    path = copy_index(living_index, str(tmp_path / "index"))
    fname, full = _file(path, "seg1_residuals")
    os.remove(full)
    with pytest.raises(plaid.IndexCorruptError, match=rf"{fname.replace('.', '[.]')} is missing"):
        plaid.Searcher(path)
    assert plaid.Index(path).verify() == [f"{fname}: missing"]
    with pytest.raises(plaid.IndexCorruptError, match=fname.replace(".", r"\.")):
        plaid.Index(path).compact(show_progress=False)


def test_damaged_manifest(tmp_path, living_index):
    path = copy_index(living_index, str(tmp_path / "index"))
    mpath = os.path.join(path, store.MANIFEST)
    with open(mpath) as f:
        text = f.read()
    with open(mpath, "w") as f:
        f.write(text[: len(text) // 2])
    with pytest.raises(plaid.IndexCorruptError, match="manifest.json"):
        plaid.Searcher(path)
    with pytest.raises(plaid.IndexCorruptError):
        plaid.Index(path)
    os.remove(mpath)
    with pytest.raises(plaid.IndexNotFoundError, match="incomplete"):
        plaid.Searcher(path)
    # a manifest that names a file of the wrong shape
    path2 = copy_index(living_index, str(tmp_path / "index2"))
    m = json.load(open(os.path.join(path2, store.MANIFEST)))
    m["arrays"]["doclens"]["shape"] = [m["arrays"]["doclens"]["shape"][0] - 1]
    with open(os.path.join(path2, store.MANIFEST), "w") as f:
        json.dump(m, f)
    with pytest.raises(plaid.IndexCorruptError, match="doclens"):
        plaid.Searcher(path2)
