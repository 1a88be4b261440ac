"""The index folder: opening errors, corruption, versions, overwrite, failed builds, verification."""
import json
import os
import shutil

import numpy as np
import pytest

import plaid
from conftest import array_fingerprint
from plaid.store import FORMAT_VERSION


def fast_indexer():
    """The codec does not matter to the folder logic: the scalar one trains fastest."""
    return plaid.Indexer(show_progress=False, codec="scalar", nbits=2)


@pytest.fixture
def index_copy(tmp_path, mini_index):
    """A private copy of the mini index (PQ, with doc_ids) to damage."""
    path = str(tmp_path / "copy")
    shutil.copytree(mini_index, path)
    return path


def manifest_of(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def write_manifest(path, manifest):
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)


def open_and_search(path, query):
    """Open the index and search it once: some files are only read on the first search."""
    return plaid.Searcher(path).search(query, k=3)


def snapshot(path, queries):
    """Everything a reader can observe of an index: files, manifest, results."""
    res = plaid.Searcher(path).search(queries, k=5)
    return sorted(os.listdir(path)), manifest_of(path), res.ids.copy(), res.scores.copy()


def assert_same_snapshot(a, b):
    assert a[0] == b[0] and a[1] == b[1]
    np.testing.assert_array_equal(a[2], b[2])
    np.testing.assert_array_equal(a[3], b[3])


ARRAYS = ["seg0_codes", "seg0_residuals", "seg0_norms", "ivf", "ivf_offsets", "doclens", "centroids", "centroid_scales",
          "norm_values", "pq_codebooks", "pq_rotation",
          "doc_ids_utf8", "doc_ids_offsets"]


def test_mini_index_has_the_expected_arrays(mini_index):
    """ARRAYS (used to parametrize below) is every array of a PQ index with doc_ids."""
    m = manifest_of(mini_index)
    assert sorted(m["arrays"]) == sorted(ARRAYS)
    for name, e in m["arrays"].items():
        assert e["file"] == f"{name}.0.npy"
        assert e["bytes"] == os.path.getsize(os.path.join(mini_index, e["file"]))
    assert sorted(os.listdir(mini_index)) == sorted([f"{n}.0.npy" for n in ARRAYS] + ["manifest.json", ".plaid-lock", ".plaid-journal"])


# -- not an index --------------------------------------------------------------------------------------
def test_missing_index_directory(tmp_path):
    path = tmp_path / "nothing-here"
    with pytest.raises(plaid.IndexNotFoundError, match=r"no index at .*nothing-here: the directory does not exist"):
        plaid.Searcher(path)
    with pytest.raises(plaid.IndexNotFoundError, match="does not exist"):
        plaid.Index(str(path))
    assert issubclass(plaid.IndexNotFoundError, FileNotFoundError)


def test_a_file_is_not_an_index(tmp_path):
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(plaid.IndexNotFoundError):
        plaid.Searcher(tmp_path / "file.txt")


def test_directory_without_manifest_incomplete_build(index_copy, mini_corpus):
    os.remove(os.path.join(index_copy, "manifest.json"))
    with pytest.raises(plaid.IndexNotFoundError, match=r"holds an incomplete index: no manifest.json \(was the build interrupted\?\)"):
        plaid.Searcher(index_copy)


@pytest.mark.parametrize("contents", [[], ["notes.txt"], ["data.npy"]])
def test_directory_without_manifest_not_an_index(tmp_path, contents):
    for name in contents:
        (tmp_path / name).write_text("x")
    with pytest.raises(plaid.IndexNotFoundError, match=r"is not a plaid index: no manifest.json"):
        plaid.Searcher(tmp_path)


# -- damaged files ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ARRAYS)
def test_missing_array_file(index_copy, mini_corpus, name):
    fname = f"{name}.0.npy"
    os.remove(os.path.join(index_copy, fname))
    with pytest.raises(plaid.IndexCorruptError, match=rf"index file {fname} is missing"):
        open_and_search(index_copy, mini_corpus[1][0])
    assert plaid.Index(index_copy).verify() == [f"{fname}: missing"]


@pytest.mark.parametrize("name", ARRAYS)
def test_truncated_array_file(index_copy, mini_corpus, name):
    fname = f"{name}.0.npy"
    full = os.path.join(index_copy, fname)
    size = os.path.getsize(full)
    with open(full, "r+b") as f:
        f.truncate(size - 1)
    with pytest.raises(plaid.IndexCorruptError,
                       match=rf"index file {fname} is truncated \({size - 1} bytes, manifest says {size}\)"):
        open_and_search(index_copy, mini_corpus[1][0])
    assert plaid.Index(index_copy).verify() == [f"{fname}: size {size - 1} bytes, expected {size}"]


def test_array_file_longer_than_recorded(index_copy, mini_corpus):
    with open(os.path.join(index_copy, "seg0_codes.0.npy"), "ab") as f:
        f.write(b"\0" * 16)
    with pytest.raises(plaid.IndexCorruptError, match=r"seg0_codes.0.npy is larger than recorded"):
        open_and_search(index_copy, mini_corpus[1][0])


def test_array_file_that_is_not_npy(index_copy, mini_corpus):
    full = os.path.join(index_copy, "ivf.0.npy")
    size = os.path.getsize(full)
    with open(full, "wb") as f:
        f.write(b"x" * size)
    with pytest.raises(plaid.IndexCorruptError, match=r"index file ivf.0.npy cannot be read \(not a .npy array"):
        open_and_search(index_copy, mini_corpus[1][0])


def test_array_with_other_shape_than_the_manifest(index_copy, mini_corpus):
    m = manifest_of(index_copy)
    m["arrays"]["centroids"]["shape"][0] += 1
    write_manifest(index_copy, m)
    with pytest.raises(plaid.IndexCorruptError, match=r"manifest field arrays.centroids.shape = \[129, 32\] \(expected \[128, 32\]\)"):
        open_and_search(index_copy, mini_corpus[1][0])


def test_opening_never_unpickles(index_copy, mini_corpus):
    """An array file replaced by a pickled object array is refused, not executed."""
    full = os.path.join(index_copy, "ivf.0.npy")
    np.save(full, np.array([{"evil": 1}, None], dtype=object), allow_pickle=True)
    m = manifest_of(index_copy)
    m["arrays"]["ivf"]["bytes"] = os.path.getsize(full)
    write_manifest(index_copy, m)
    with pytest.raises(plaid.IndexCorruptError, match=r"index file ivf.0.npy holds dtype object, expected uint16"):
        open_and_search(index_copy, mini_corpus[1][0])


def test_manifest_inconsistent_with_the_arrays(index_copy, mini_corpus):
    m = manifest_of(index_copy)
    m["num_tokens"] += 5
    write_manifest(index_copy, m)
    with pytest.raises(plaid.IndexCorruptError, match=r"manifest field segments hold \d+ tokens, not num_tokens=\d+"):
        plaid.Searcher(index_copy)


def test_manifest_missing_a_field(index_copy):
    m = manifest_of(index_copy)
    del m["dim"]
    write_manifest(index_copy, m)
    with pytest.raises(plaid.IndexCorruptError, match=r"manifest field dim is missing"):
        plaid.Searcher(index_copy)


# -- manifest versions and JSON ---------------------------------------------------------------------------
@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99])
def test_newer_format_version(index_copy, version):
    m = manifest_of(index_copy)
    m["format_version"] = version
    write_manifest(index_copy, m)
    with pytest.raises(plaid.FormatVersionError,
                       match=rf"index format version {version} is not supported \(this plaid reads versions "
                             rf"2, {FORMAT_VERSION}\); "
                             r"it was written by a newer plaid"):
        plaid.Searcher(index_copy)
    with pytest.raises(plaid.IndexCorruptError):  # FormatVersionError is an IndexCorruptError
        plaid.Index(index_copy)


@pytest.mark.parametrize("version", [1, 0, -1, "1", None, 1.5])
def test_older_or_unknown_format_version(index_copy, version):
    m = manifest_of(index_copy)
    m["format_version"] = version
    write_manifest(index_copy, m)
    with pytest.raises(plaid.FormatVersionError, match=rf"index format version {version!r} is not supported.*rebuild"):
        plaid.Searcher(index_copy)


def test_format_version_absent(index_copy):
    m = manifest_of(index_copy)
    del m["format_version"]
    write_manifest(index_copy, m)
    with pytest.raises(plaid.FormatVersionError, match=r"version None is not supported"):
        plaid.Searcher(index_copy)


@pytest.mark.parametrize("text", ["", "{", '{"format": "plaid-index", "format_version": 1, "arr', "\xff\xfe garbage"])
def test_corrupt_json_manifest(index_copy, text):
    with open(os.path.join(index_copy, "manifest.json"), "wb") as f:
        f.write(text.encode("latin-1"))
    with pytest.raises(plaid.IndexCorruptError, match=r"manifest.json is not valid JSON"):
        plaid.Searcher(index_copy)


@pytest.mark.parametrize("doc,match", [
    ([1, 2], "is not a plaid index manifest"),
    ({"format": "something-else", "format_version": 1, "arrays": {}}, "is not a plaid index manifest"),
    ({"format": "plaid-index", "format_version": FORMAT_VERSION}, "manifest field generation is missing"),
])
def test_json_that_is_not_a_manifest(index_copy, doc, match):
    write_manifest(index_copy, doc)
    with pytest.raises(plaid.IndexCorruptError, match=match):
        plaid.Searcher(index_copy)


# -- verification --------------------------------------------------------------------------------------
def test_verify_intact_index(mini_index):
    assert plaid.Index(mini_index).verify() == []
    assert plaid.Searcher(mini_index, verify=True).num_documents == 120


@pytest.mark.parametrize("name", ARRAYS)
def test_verify_names_a_byte_flipped_file(index_copy, mini_corpus, name):
    fname = f"{name}.0.npy"
    full = os.path.join(index_copy, fname)
    size = os.path.getsize(full)
    with open(full, "r+b") as f:  # flip the last byte: inside the data, the header stays valid
        f.seek(size - 1)
        b = f.read(1)
        f.seek(size - 1)
        f.write(bytes([b[0] ^ 0xFF]))
    assert plaid.Index(index_copy).verify() == [f"{fname}: checksum mismatch (the file was altered or corrupted)"]
    with pytest.raises(plaid.IndexCorruptError, match=rf"index verification failed: {fname}: checksum mismatch"):
        plaid.Searcher(index_copy, verify=True)


# -- building into existing directories ------------------------------------------------------------------
def test_build_into_non_empty_directory_without_overwrite(index_copy, mini_corpus):
    docs, queries = mini_corpus
    before = snapshot(index_copy, queries)
    with pytest.raises(plaid.IndexExistsError, match=r"is not empty \(\d+ entries\); pass overwrite=True"):
        fast_indexer().build(index_copy, docs[:50])
    assert_same_snapshot(snapshot(index_copy, queries), before)
    assert issubclass(plaid.IndexExistsError, FileExistsError)


def test_build_into_directory_with_other_files_without_overwrite(tmp_path, mini_corpus):
    docs, _ = mini_corpus
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(plaid.IndexExistsError, match="is not empty"):
        fast_indexer().build(tmp_path, docs)
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_build_onto_a_file(tmp_path, mini_corpus):
    (tmp_path / "f").write_text("x")
    with pytest.raises(plaid.IndexExistsError, match="exists and is not a directory"):
        fast_indexer().build(tmp_path / "f", mini_corpus[0])


def test_build_into_an_existing_empty_directory(tmp_path, mini_corpus):
    docs, queries = mini_corpus
    index = fast_indexer().build(tmp_path, docs)
    assert index.generation == 0 and plaid.Searcher(tmp_path).search(queries[0]).ids.shape == (1, 10)


def test_overwrite_replaces_an_existing_index(tmp_path, mini_corpus):
    docs, queries = mini_corpus
    path = tmp_path / "idx"
    first = fast_indexer().build(path, docs, doc_ids=[f"a{i}" for i in range(len(docs))])
    old_files = set(os.listdir(path))
    second = plaid.Indexer(show_progress=False, pq_m=16).build(path, docs[:60], doc_ids=[f"b{i}" for i in range(60)],
                                                               overwrite=True)
    assert second.generation == first.generation + 1 == 1
    assert second.codec["name"] == "pq" and second.num_documents == 60
    files = set(os.listdir(path))
    assert not files & (old_files - {"manifest.json", ".plaid-lock", ".plaid-journal"})  # every file of generation 0 is gone
    assert all(f in ("manifest.json", ".plaid-lock", ".plaid-journal") or f.endswith(".1.npy") for f in files)
    assert second.verify() == []
    reopened = plaid.Index(str(path))
    assert reopened.num_documents == 60 and reopened.doc_ids == [f"b{i}" for i in range(60)]
    res = plaid.Searcher(path).search(queries, k=5)
    assert res.ids.max() < 60
    assert all(x is None or x.startswith("b") for row in res.doc_ids() for x in row)
    # a query made of one of the remaining documents still finds it
    assert plaid.Searcher(path).search(docs[12], k=1).doc_ids() == [["b12"]]
    # and once more: generation 2, files of generation 1 removed
    third = fast_indexer().build(path, docs, overwrite=True)
    assert third.generation == 2 and third.doc_ids is None
    assert all(f in ("manifest.json", ".plaid-lock", ".plaid-journal") or f.endswith(".2.npy") for f in os.listdir(path))


def test_overwrite_over_leftovers_of_an_unfinished_build(index_copy, mini_corpus):
    """A build killed before its commit leaves files named in the journal: the next build removes
    them. Files nobody recorded (here: the old generation, once its manifest is gone) are kept."""
    docs, queries = mini_corpus
    old = sorted(f for f in os.listdir(index_copy) if f.endswith(".npy"))
    os.remove(os.path.join(index_copy, "manifest.json"))
    with open(os.path.join(index_copy, "seg0_codes.7.npy"), "wb") as f:
        f.write(b"partial")
    with open(os.path.join(index_copy, ".plaid-journal"), "w") as f:
        f.write("seg0_codes.7.npy\nseg0_residuals.7.npy\nmanifest.json.7.tmp\n")
    index = fast_indexer().build(index_copy, docs, overwrite=True)
    assert index.verify() == [] and index.generation == 1  # above every generation named in the folder
    assert set(os.listdir(index_copy)) == \
        {e["file"] for e in index.manifest["arrays"].values()} | {"manifest.json", ".plaid-lock", ".plaid-journal"} \
        | set(old)
    assert plaid.Searcher(index_copy).search(queries[0], k=3).ids.shape == (1, 3)


def test_overwrite_refused_when_the_directory_holds_foreign_files(index_copy, mini_corpus):
    docs, queries = mini_corpus
    with open(os.path.join(index_copy, "notes.txt"), "w") as f:
        f.write("not plaid's")
    os.mkdir(os.path.join(index_copy, "subdir"))
    before = snapshot(index_copy, queries)
    with pytest.raises(plaid.IndexExistsError,
                       match=r"holds files that are not part of a plaid index \(notes.txt, subdir\); refusing to overwrite it"):
        fast_indexer().build(index_copy, docs[:30], overwrite=True)
    assert_same_snapshot(snapshot(index_copy, queries), before)
    with open(os.path.join(index_copy, "notes.txt")) as f:
        assert f.read() == "not plaid's"


# -- builds that fail midway ---------------------------------------------------------------------------------
def nan_in_second_half(docs, form):
    bad = [d.copy() for d in docs]
    bad[len(bad) * 3 // 4][0, 0] = np.nan
    return (d for d in bad) if form == "generator" else bad


def raising_iterator(docs):
    for i, d in enumerate(docs):
        if i == len(docs) * 3 // 4:
            raise RuntimeError("the data source went away")
        yield d


FAILURES = {
    "NaN in the 2nd half of a generator": (lambda docs: nan_in_second_half(docs, "generator"), plaid.InvalidInputError,
                                           r"document 90 contains NaN or inf"),
    "NaN in the 2nd half of a list": (lambda docs: nan_in_second_half(docs, "list"), plaid.InvalidInputError,
                                      r"document 90 contains NaN or inf"),
    "iterator raising midway": (raising_iterator, RuntimeError, "went away"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_build_into_a_new_path_leaves_nothing(tmp_path, mini_corpus, failure):
    docs, _ = mini_corpus
    make, exc, match = FAILURES[failure]
    path = tmp_path / "new"
    with pytest.raises(exc, match=match):
        plaid.Indexer(show_progress=False, pq_m=16).build(path, make(docs))
    assert not os.path.exists(path)
    with pytest.raises(plaid.IndexNotFoundError):
        plaid.Searcher(path)


@pytest.mark.parametrize("failure", list(FAILURES))
def test_failed_build_into_an_empty_directory_leaves_it_empty(tmp_path, mini_corpus, failure):
    docs, _ = mini_corpus
    make, exc, match = FAILURES[failure]
    with pytest.raises(exc, match=match):
        fast_indexer().build(tmp_path, make(docs))
    assert os.listdir(tmp_path) == []
    with pytest.raises(plaid.IndexNotFoundError, match="is not a plaid index"):
        plaid.Searcher(tmp_path)


@pytest.mark.parametrize("failure", list(FAILURES) + ["bad doc_ids"])
def test_failed_overwrite_leaves_the_old_index_intact(index_copy, mini_corpus, failure):
    docs, queries = mini_corpus
    before = snapshot(index_copy, queries)
    fingerprint = array_fingerprint(index_copy)
    if failure == "bad doc_ids":
        with pytest.raises(plaid.InvalidInputError, match="doc_ids"):
            fast_indexer().build(index_copy, docs, doc_ids=["same"] * len(docs), overwrite=True)
    else:
        make, exc, match = FAILURES[failure]
        with pytest.raises(exc, match=match):
            plaid.Indexer(show_progress=False, pq_m=16).build(index_copy, make(docs), overwrite=True)
    assert_same_snapshot(snapshot(index_copy, queries), before)
    assert array_fingerprint(index_copy) == fingerprint
    assert plaid.Index(index_copy).verify() == []
    assert plaid.Index(index_copy).doc_ids[:2] == ["m0", "m1"]


# -- readers during an overwrite ------------------------------------------------------------------------------
def test_searcher_opened_before_an_overwrite_keeps_the_old_index(tmp_path, mini_corpus):
    docs, queries = mini_corpus
    path = tmp_path / "idx"
    fast_indexer().build(path, docs)
    numpy_s, torch_s = plaid.Searcher(path), plaid.Searcher(path, engine="torch")
    fast_indexer().build(path, docs[:30], overwrite=True)
    for s in (numpy_s, torch_s):
        res = s.search(queries, k=5)
        assert res.ids.max() >= 30  # documents of the old index
    assert plaid.Searcher(path).search(queries, k=5).ids.max() < 30


def test_searcher_with_doc_ids_opened_before_an_overwrite_keeps_working(tmp_path, mini_corpus):
    docs, queries = mini_corpus
    path = tmp_path / "idx"
    fast_indexer().build(path, docs, doc_ids=[f"a{i}" for i in range(len(docs))])
    s = plaid.Searcher(path)
    fast_indexer().build(path, docs[:30], doc_ids=[f"b{i}" for i in range(30)], overwrite=True)
    res = s.search(queries, k=5)
    assert res.doc_ids()[0][0].startswith("a")
