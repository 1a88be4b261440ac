"""Bad input to a living index, the writer lock, and the id bookkeeping of add / delete / compact.

Every refused mutation must leave the committed index exactly as it was (same generation, same
files), and name what was wrong.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import plaid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lifecycle_crash_child as child  # noqa: E402
from lifecycle_util import copy_index, folder_bytes, unreferenced_files  # noqa: E402

SEED = 9


@pytest.fixture(scope="module")
def named_index(tmp_path_factory):
    """200 documents with external ids g0-0 .. g0-199 (dim 32)."""
    path = str(tmp_path_factory.mktemp("errors") / "named")
    child.build(path, SEED)
    return path


@pytest.fixture(scope="module")
def plain_index(tmp_path_factory):
    """The same documents, without external ids."""
    path = str(tmp_path_factory.mktemp("errors") / "plain")
    docs = [child.doc_vectors(SEED, x) for x in child.initial_state().ids]
    plaid.Indexer(pq_m=8, show_progress=False).build(path, docs)
    return path


@pytest.fixture
def index(tmp_path, named_index):
    return plaid.Index(copy_index(named_index, str(tmp_path / "index")))


def _docs(names):
    return [child.doc_vectors(SEED, x) for x in names]


def _snapshot(index):
    """What a refused mutation must not change."""
    index.refresh()
    return index.generation, sorted(os.listdir(index.path)), index.manifest


def test_add_vectors_of_another_dim(index):
    before = _snapshot(index)
    with pytest.raises(plaid.InvalidInputError, match="dim"):
        index.add([np.ones((4, 48), np.float32)], doc_ids=["wide"], show_progress=False)
    assert _snapshot(index) == before


def test_delete_unknown_ids_lists_a_few(index):
    before = _snapshot(index)
    unknown = [f"nope-{i}" for i in range(8)]
    with pytest.raises(plaid.InvalidInputError) as e:
        index.delete(["g0-1"] + unknown + [10**6, -1])
    msg = str(e.value)
    assert "10 unknown" in msg and "nope-0" in msg and "nope-1" in msg
    assert _snapshot(index) == before  # g0-1 was not deleted either
    assert index.delete(["g0-1"]) == 1
    with pytest.raises(plaid.InvalidInputError, match="g0-1"):
        index.delete(["g0-1"])  # already deleted
    with pytest.raises(plaid.InvalidInputError, match=r"\b1\b"):
        index.delete([1])
    with pytest.raises(plaid.InvalidInputError):
        index.delete([True])
    assert index.delete([]) == 0


def test_add_duplicate_external_ids(index):
    before = _snapshot(index)
    with pytest.raises(plaid.InvalidInputError, match="new-1"):
        index.add(_docs(["g1-0", "g1-1", "g1-2"]), doc_ids=["new-0", "new-1", "new-1"], show_progress=False)
    with pytest.raises(plaid.InvalidInputError, match="g0-5"):
        index.add(_docs(["g1-0", "g1-1"]), doc_ids=["new-0", "g0-5"], show_progress=False)
    with pytest.raises(plaid.InvalidInputError, match="2 entries for 3"):
        index.add(_docs(["g1-0", "g1-1", "g1-2"]), doc_ids=["new-0", "new-1"], show_progress=False)
    assert _snapshot(index) == before
    # the id of a deleted document may name a new one; lookups then find the new one
    index.delete(["g0-5"])
    new = index.add(_docs(["g1-0"]), doc_ids=["g0-5"], show_progress=False)
    assert new.tolist() == [200]
    assert index.internal_ids(["g0-5"]).tolist() == [200]
    assert index.external_ids([5, 200]) == ["g0-5", "g0-5"]
    res = plaid.Searcher(index.path).search(child.doc_vectors(SEED, "g1-0"), k=1)
    assert res.ids.tolist() == [[200]] and res.doc_ids() == [["g0-5"]]


def test_add_with_and_without_doc_ids(index, plain_index, tmp_path):
    before = _snapshot(index)
    with pytest.raises(plaid.InvalidInputError, match="doc_ids"):
        index.add(_docs(["g1-0"]), show_progress=False)
    assert _snapshot(index) == before
    plain = plaid.Index(copy_index(plain_index, str(tmp_path / "plain")))
    before = _snapshot(plain)
    with pytest.raises(plaid.InvalidInputError, match="without doc_ids"):
        plain.add(_docs(["g1-0"]), doc_ids=["x"], show_progress=False)
    assert _snapshot(plain) == before
    assert plain.add(_docs(["g1-0", "g1-1"]), show_progress=False).tolist() == [200, 201]
    with pytest.raises(plaid.InvalidInputError, match="no external doc_ids"):
        plain.delete(["g0-1"])


def test_subset_with_unknown_ids(index):
    s = plaid.Searcher(index.path)
    q = child.doc_vectors(SEED, "g0-1")[:5]
    with pytest.raises(plaid.InvalidInputError, match="nope"):
        s.search(q, k=3, subset=["g0-1", "nope"])
    with pytest.raises(plaid.InvalidInputError, match="500"):
        s.search(q, k=3, subset=[1, 2, 500])
    with pytest.raises(plaid.InvalidInputError, match="-3"):
        s.search(q, k=3, subset=[1, -3])
    with pytest.raises(plaid.InvalidInputError, match="2 subsets given for 3 queries"):
        s.search([q, q, q], k=3, subset=[[1, 2], [3]])
    # deleted documents named in a subset are ignored, not an error
    index.delete(["g0-1"])
    s.reload()
    res = s.search(q, k=3, subset=["g0-1", "g0-2"])
    assert res.ids[0].tolist() == [2, -1, -1]


def test_second_writer_is_refused_while_readers_proceed(index):
    """Another process holds the writer lock: every mutation fails at once; reading works."""
    q = child.doc_vectors(SEED, "g0-3")[:5]
    expected = plaid.Searcher(index.path).search(q, k=5)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys
        fd = os.open(os.path.join({index.path!r}, ".plaid-lock"), os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(index)
        with pytest.raises(plaid.IndexLockedError, match="another process"):
            index.add(_docs(["g1-0"]), doc_ids=["g1-0"], show_progress=False)
        with pytest.raises(plaid.IndexLockedError):
            index.delete(["g0-1"])
        with pytest.raises(plaid.IndexLockedError):
            index.compact(show_progress=False)
        with pytest.raises(plaid.IndexLockedError):
            plaid.Indexer(pq_m=8, show_progress=False).build(index.path, _docs(["g1-0"] * 20), overwrite=True)
        assert _snapshot(index) == before
        # readers proceed on the last committed state
        assert plaid.Index(index.path).verify() == []
        res = plaid.Searcher(index.path).search(q, k=5)
        np.testing.assert_array_equal(res.ids, expected.ids)
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the lock died with its holder: writing works again
    assert index.delete(["g0-1"]) == 1


def test_compact_keeps_ids_and_reclaims_space(index):
    s = plaid.Searcher(index.path)
    names = [f"g1-{i}" for i in range(40)]
    index.add(_docs(names), doc_ids=names, show_progress=False)
    gone = list(range(0, 240, 3))
    index.delete(gone[:40])
    index.delete([index.doc_ids[i] for i in gone[40:]])
    live = [i for i in range(240) if i not in set(gone)]
    queries = [child.doc_vectors(SEED, index.doc_ids[i])[:4] for i in live[::10]]
    s.reload()
    before = s.search(queries, k=10, subset=live[:200])
    pipeline = s.search(queries, k=10)
    size = folder_bytes(index.path)
    tombstone_files = [n for n in index.manifest["arrays"] if n.startswith("tombstones")]
    assert len(tombstone_files) == 2 and len(index.manifest["segments"]) == 2

    index.compact(show_progress=False)
    m = index.manifest
    assert len(m["segments"]) == 1
    seg = m["segments"][0]["name"]
    assert m["normalized"]  # unit-norm corpus: the segment stores norms too
    assert sorted(n for n in m["arrays"] if n.startswith("seg")) == [f"{seg}_codes", f"{seg}_norms",
                                                                     f"{seg}_residuals"]
    assert len([n for n in m["arrays"] if n.startswith("tombstones")]) == 1
    assert unreferenced_files(index.path) == []
    assert folder_bytes(index.path) < size
    assert index.deleted_ids().tolist() == gone and len(index) == len(live)
    assert index.num_tokens == sum(len(child.doc_vectors(SEED, index.doc_ids[i])) for i in live)
    s.reload()
    after = s.search(queries, k=10, subset=live[:200])
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(s.search(queries, k=10).ids, pipeline.ids)
    # a second compaction of a compacted index changes nothing visible
    index.compact(show_progress=False)
    s.reload()
    np.testing.assert_array_equal(s.search(queries, k=10).ids, pipeline.ids)
    assert index.verify() == []


def test_external_ids_are_data_and_round_trip(index):
    names = ["ドキュメント-1", "émoji-😀", "with space", "g0-5x"]
    new = index.add(_docs(["g1-0", "g1-1", "g1-2", "g1-3"]), doc_ids=names, show_progress=False)
    reopened = plaid.Index(index.path)
    assert reopened.internal_ids(names).tolist() == new.tolist()
    assert reopened.external_ids(new) == names
    for name in ("doc_ids_utf8", "doc_ids_offsets"):  # plain arrays: no pickle needed to read them
        entry = reopened.manifest["arrays"][name]
        arr = np.load(os.path.join(index.path, entry["file"]), allow_pickle=False)
        assert arr.dtype.kind in "iu"
    res = plaid.Searcher(index.path).search(child.doc_vectors(SEED, "g1-1"), k=1)
    assert res.doc_ids() == [["émoji-😀"]]


def test_add_from_a_generator_leaves_no_spill_file(index):
    names = [f"g1-{i}" for i in range(6)]
    new = index.add((d for d in _docs(names)), doc_ids=names, show_progress=False)
    assert new.tolist() == list(range(200, 206))
    assert unreferenced_files(index.path) == []
    before = _snapshot(index)

    def bad():
        yield from _docs(names[:2])
        yield np.ones((3, 16), np.float32)  # wrong dim, after two good documents

    with pytest.raises(plaid.InvalidInputError, match="dim"):
        index.add(bad(), doc_ids=["b0", "b1", "b2"], show_progress=False)
    assert _snapshot(index) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_default_searcher_memory_maps_the_token_arrays(index):
    def mapped(path):
        with open("/proc/self/maps") as f:
            return {os.path.basename(ln.split()[-1]) for ln in f if path in ln}

    files = {e["file"] for n, e in index.manifest["arrays"].items() if n.endswith(("_codes", "_residuals", "_norms"))}
    assert any(n.endswith("_norms") for n in index.manifest["arrays"])
    lazy = plaid.Searcher(index.path)
    assert files <= mapped(index.path)
    q = [child.doc_vectors(SEED, f"g0-{i}")[:5] for i in range(0, 200, 20)]
    res_lazy = lazy.search(q, k=5)
    del lazy
    import gc

    gc.collect()
    loaded = plaid.Searcher(index.path, load_all=True)
    assert not files & mapped(index.path)
    res = loaded.search(q, k=5)
    np.testing.assert_array_equal(res.ids, res_lazy.ids)
    np.testing.assert_array_equal(res.scores, res_lazy.scores)


def test_an_index_handle_follows_commits_made_by_another_handle(tmp_path, small_corpus):
    """A handle opened before another handle's add reads the new generation, not missing files."""
    docs, _ = small_corpus
    path = str(tmp_path / "idx")
    plaid.Indexer(show_progress=False, pq_m=16).build(path, docs[:100], doc_ids=[f"a{i}" for i in range(100)])
    stale = plaid.Index(path)
    plaid.Index(path).add(docs[100:105], doc_ids=[f"z{i}" for i in range(5)], show_progress=False)
    assert stale.internal_ids(["z3"]).tolist() == [103]
    assert stale.generation == 1 and stale.external_ids([0, 104]) == ["a0", "z4"]
