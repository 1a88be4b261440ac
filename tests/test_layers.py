"""The layering: search and indexing stand on the store and the codecs, never on each other.

Each check runs in a fresh interpreter, so modules imported by other tests do not hide a cycle.
"""
import subprocess
import sys

import pytest


def _modules_after(import_line: str, prefix: str = "plaid") -> set:
    code = (f"import sys\n{import_line}\n"
            f"print('\\n'.join(sorted(m for m in sys.modules if m.startswith({prefix!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.parametrize("module, forbidden", [
    ("plaid.search", "plaid.indexing"),
    ("plaid.search.searcher", "plaid.indexing"),
    ("plaid.indexing", "plaid.search"),
    ("plaid.indexing.indexer", "plaid.search"),
    ("plaid.indexing.index", "plaid.search"),
    ("plaid.store", "plaid.search"),
    ("plaid.store", "plaid.indexing"),
    ("plaid.codecs", "plaid.store"),
    ("plaid.search", "plaid.distributed"),
    ("plaid.indexing", "plaid.distributed"),
    ("plaid.store", "plaid.distributed"),
])
def test_layer_does_not_import(module, forbidden):
    loaded = _modules_after(f"import {module}")
    assert module in loaded
    bad = sorted(m for m in loaded if m == forbidden or m.startswith(forbidden + "."))
    assert not bad, f"importing {module} imported {bad}"


def test_import_plaid_is_light_and_public_names_resolve():
    loaded = _modules_after("import plaid")
    assert not any(m.startswith(("plaid.search", "plaid.indexing")) for m in loaded), loaded
    loaded = _modules_after("import plaid; plaid.Indexer; plaid.Index; plaid.Searcher; plaid.maxsim; plaid.Embeddings")
    assert {"plaid.indexing.indexer", "plaid.search.searcher"} <= loaded


@pytest.mark.parametrize("import_line", [
    "import plaid",
    "import plaid; plaid.Indexer; plaid.Index; plaid.Searcher",
    "import plaid.distributed",
    "import plaid.distributed.sharded; import plaid.cli",
    "import plaid.cli; plaid.cli.build_parser()",
])
def test_ray_is_imported_only_by_sharded_build_and_search(import_line):
    """Ray is an optional extra: nothing in the core imports it (nor does opening the sharded
    layer's manifest, which ``plaid info`` and ``plaid verify`` do)."""
    loaded = _modules_after(import_line, prefix="ray")
    assert not {m for m in loaded if m == "ray" or m.startswith("ray.")}, f"{import_line!r} imported ray"


def test_only_the_store_opens_index_files():
    """No module outside plaid.store names the folder's files or uses the store's file primitives."""
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent / "plaid"
    offenders = []
    for f in root.rglob("*.py"):
        rel = f.relative_to(root).as_posix()
        if rel.startswith("store/"):
            continue
        text = f.read_text()
        for needle in ("manifest.json", ".plaid-lock", ".plaid-journal", "store.files", "store import files",
                       "generation}.npy"):
            if needle in text:
                offenders.append(f"{rel}: {needle}")
    assert not offenders, offenders
