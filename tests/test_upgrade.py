"""Format version 2 (float16 norms and centroids, int32 inverted file): read as it is, never
changed, converted in place by ``plaid upgrade``.

``tests/data/v2-index`` was written by plaid 0.1.0 (format 2) from the vectors beside it; its
search results for five queries were recorded by that plaid (``v2-index-expected.npy``).
"""
import json
import os
import shutil

import numpy as np
import pytest

import plaid
from plaid.cli import main as cli_main
from plaid.store import FORMAT_VERSION, upgrade

HERE = os.path.dirname(os.path.abspath(__file__))
V2 = os.path.join(HERE, "data", "v2-index")


@pytest.fixture
def v2(tmp_path):
    path = str(tmp_path / "v2")
    shutil.copytree(V2, path)
    return path


def _data():
    x = np.load(os.path.join(HERE, "data", "v2-index-docs.npy")).astype(np.float32)
    lens = np.load(os.path.join(HERE, "data", "v2-index-doclens.npy"))
    offs = np.concatenate([[0], np.cumsum(lens)])
    docs = [x[offs[i] : offs[i + 1]] for i in range(len(lens))]
    queries = [d[:3] for d in docs[:5]]
    ids, scores = np.load(os.path.join(HERE, "data", "v2-index-expected.npy"))
    return docs, queries, ids.astype(np.int64), scores.astype(np.float32)


def _manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def _files(path):
    return {n: open(os.path.join(path, n), "rb").read() for n in os.listdir(path)}


@pytest.mark.parametrize("engine", ["numpy", "torch"])
def test_a_version_2_index_is_searched_as_the_plaid_that_wrote_it(v2, engine):
    docs, queries, ids, scores = _data()
    assert _manifest(v2)["format_version"] == 2
    res = plaid.Searcher(v2, engine=engine).search(queries, k=3)
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_allclose(res.scores, scores, rtol=0, atol=1e-5)
    assert res.doc_ids()[0][0] == "doc-0"
    assert plaid.Index(v2).verify() == []


def test_a_version_2_index_is_never_changed_and_names_the_upgrade(v2):
    docs, *_ = _data()
    before = _files(v2)
    index = plaid.Index(v2)
    for op in (lambda: index.add(docs[:2], doc_ids=["x", "y"]), lambda: index.delete([1]),
               lambda: index.compact()):
        with pytest.raises(plaid.FormatVersionError, match=r"format version 2.*`plaid upgrade .*v2`"):
            op()
    after = _files(v2)
    assert {n: after[n] for n in before} == before and set(after) - set(before) <= {".plaid-lock", ".plaid-journal"}


def test_upgrade_converts_in_place_and_keeps_the_answers(v2):
    docs, queries, ids, scores = _data()
    old = _manifest(v2)
    assert upgrade(v2) is True
    m = _manifest(v2)
    assert m["format_version"] == FORMAT_VERSION and m["generation"] == old["generation"] + 1
    assert m["arrays"]["seg0_norms"]["dtype"] == "|u1" and m["arrays"]["norm_values"]["shape"] == [256]
    # only the norms were rewritten: every other array keeps its file
    for name, e in old["arrays"].items():
        if name != "seg0_norms":
            assert m["arrays"][name] == e, name
    assert not os.path.exists(os.path.join(v2, old["arrays"]["seg0_norms"]["file"]))  # superseded file removed
    assert plaid.Index(v2).verify() == []
    res = plaid.Searcher(v2).search(queries, k=3)
    np.testing.assert_array_equal(res.ids, ids)
    np.testing.assert_allclose(res.scores, scores, rtol=2e-3, atol=0)  # a one-byte norm: within 0.2%
    # now writable: add, delete, compact work, and the added documents are found
    index = plaid.Index(v2)
    new = index.add([docs[7] * 1.0], doc_ids=["doc-new"])
    assert plaid.Searcher(v2).search([docs[7][:4]], k=2).doc_ids()[0] in (["doc-7", "doc-new"], ["doc-new", "doc-7"])
    index.delete(new)
    index.compact()
    assert plaid.Index(v2).verify() == []
    assert upgrade(v2) is False  # already current: nothing written
    assert plaid.Index(v2).generation == _manifest(v2)["generation"]


def test_upgrade_refuses_a_damaged_index_and_leaves_it_as_it_was(v2):
    path = os.path.join(v2, "seg0_norms.0.npy")
    arr = np.load(path)
    arr[5] = np.float16(np.nan)
    np.save(path, arr)
    m = _manifest(v2)
    m["arrays"]["seg0_norms"]["crc32"] = plaid.store.files.file_crc32(os.open(path, os.O_RDONLY))
    with open(os.path.join(v2, "manifest.json"), "w") as f:
        json.dump(m, f)
    before = _files(v2)
    with pytest.raises(plaid.IndexCorruptError, match=r"seg0_norms.0.npy: token norms that are NaN"):
        upgrade(v2)
    after = _files(v2)
    assert {n: after[n] for n in before} == before and set(after) - set(before) <= {".plaid-lock", ".plaid-journal"}


def test_plaid_upgrade_command(v2, capsys):
    assert cli_main(["upgrade", v2]) == 0
    assert capsys.readouterr().out.strip() == f"upgraded: {v2}: format version 2 -> {FORMAT_VERSION}"
    assert cli_main(["upgrade", v2]) == 0
    assert capsys.readouterr().out.strip() == f"ok: {v2}: already format version {FORMAT_VERSION}"
    assert cli_main(["upgrade", os.path.join(v2, "nothing")]) == 2
    assert "plaid upgrade: error: no index at" in capsys.readouterr().err
