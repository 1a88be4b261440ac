"""The plaid command: every subcommand's --help, msmarco-5k end to end, text end to end, bad inputs."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import plaid
from conftest import MSMARCO, REPO, requires_msmarco, write_beir
from plaid.cli import build_parser, main
from plaid.store import FORMAT_VERSION

EXHAUSTIVE = {"nDCG@10": 0.8024, "R@100": 0.8248, "RR@10": 1.0}  # msmarco-5k README, exact MaxSim


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``plaid argv`` run in this process."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_input_error(code, err, match):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err  # one clear line, no traceback
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


# -- --help ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [None, "index", "search", "evaluate", "info"])
def test_help_documents_every_option(capsys, command):
    with pytest.raises(SystemExit) as e:
        main(([command] if command else []) + ["--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    parser = build_parser()
    if command is None:
        for name in ("index", "search", "evaluate", "info"):
            assert name in out
        return
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        for opt in action.option_strings:
            assert opt in out
        assert action.help, action.dest  # every option says what it does
        if action.option_strings and action.default not in (None, False, "==SUPPRESS==") and action.dest != "help":
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert f"default: {shown}" in out, action.dest


# -- msmarco-5k: the full CLI path ------------------------------------------------------------------
@pytest.fixture(scope="session")
def msmarco_run(tmp_path_factory):
    if not os.path.exists(os.path.join(MSMARCO, "doc_embeddings.f16.npy")):
        pytest.skip(f"msmarco-5k not found at {MSMARCO} (set PLAID_MSMARCO_5K to its folder)")
    root = tmp_path_factory.mktemp("msmarco")
    idx, run = root / "idx", root / "run.trec"
    assert main(["index", str(idx), "--embeddings", MSMARCO, "--quiet"]) == 0
    assert main(["search", str(idx), "--query-embeddings", MSMARCO, "--k", "100", "--output", str(run), "--quiet"]) == 0
    return str(idx), str(run)


@requires_msmarco
def test_msmarco_cli_matches_exhaustive_maxsim(msmarco_run, capsys):
    idx, run = msmarco_run
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--qrels", os.path.join(MSMARCO, "qrels", "test.tsv"),
                             "--metrics", "nDCG@10", "RR@10", "R@100", "--index", idx, "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["queries"] == 43 and res["unjudged_queries"] == 7
    m = res["metrics"]
    assert abs(m["nDCG@10"] - EXHAUSTIVE["nDCG@10"]) <= 0.01, m
    assert abs(m["R@100"] - EXHAUSTIVE["R@100"]) <= 0.02, m
    assert m["RR@10"] >= 0.95, m
    code, out, _ = run_cli(capsys, "evaluate", "--run", run, "--qrels", os.path.join(MSMARCO, "qrels", "test.tsv"))
    assert code == 0 and "nDCG@10" in out and "43 judged queries" in out


@requires_msmarco
def test_msmarco_run_file_and_info(msmarco_run, capsys):
    idx, run = msmarco_run
    with open(os.path.join(MSMARCO, "doc_ids.txt")) as f:
        names = set(f.read().split())
    with open(os.path.join(MSMARCO, "query_ids.txt")) as f:
        qids = f.read().split()
    rows = [line.split() for line in open(run)]
    assert all(len(r) == 6 and r[1] == "Q0" and r[5] == "plaid" and r[2] in names for r in rows)
    assert [r[0] for r in rows[:1]] == qids[:1] and {r[0] for r in rows} == set(qids)
    first = [r for r in rows if r[0] == qids[0]]
    assert [int(r[3]) for r in first] == list(range(1, len(first) + 1))
    assert all(float(a[4]) >= float(b[4]) for a, b in zip(first, first[1:]))
    code, out, _ = run_cli(capsys, "info", idx, "--json")
    info = json.loads(out)
    assert code == 0 and info["num_documents"] == 5000 and info["num_tokens"] == 393138
    assert info["format_version"] == FORMAT_VERSION and info["codec"]["name"] == "pq" and info["has_doc_ids"]
    assert 30 < info["bytes_per_token"] < 60
    code, out, _ = run_cli(capsys, "info", idx)
    assert code == 0 and "bytes per token" in out and "format version" in out


# -- text: corpus.jsonl -> index -> search -> evaluate, both checkpoint layouts --------------------
@pytest.mark.parametrize("layout,codec", [("stanford", ["--codec", "scalar", "--nbits", "4"]),
                                          ("pylate", ["--codec", "scalar", "--nbits", "2"])])
def test_text_end_to_end(capsys, tmp_path, checkpoints, text_collection, layout, codec):
    ck, beir = checkpoints[layout], text_collection
    idx, emb, run = tmp_path / "idx", tmp_path / "emb", tmp_path / "run.trec"
    code, _, err = run_cli(capsys, "index", idx, "--corpus", f"{beir}/corpus.jsonl", "--checkpoint", ck,
                           "--save-embeddings", emb, "--doc-maxlen", 64, "--quiet", *codec)
    assert code == 0, err
    assert sorted(os.listdir(emb)) == ["doc_embeddings.f16.npy", "doc_ids.txt", "doclens.npy"]
    code, _, err = run_cli(capsys, "search", idx, "--queries", f"{beir}/queries.jsonl", "--checkpoint", ck,
                           "--k", 10, "--output", run, "--quiet")
    assert code == 0, err
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--qrels", f"{beir}/qrels/test.tsv", "--index", idx,
                             "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["queries"] == 10
    # the queries are the first words of their relevant passage (a random projection: no trained model)
    assert res["metrics"]["RR@10"] >= 0.5, res

    # the index answers like exhaustive MaxSim over the saved embeddings
    from plaid.bundle import load_bundle
    from plaid.encoders import ColBERTEncoder
    from plaid.evaluation import load_queries, read_run

    docs, ids = load_bundle(str(emb))
    assert ids == plaid.Index(str(idx)).doc_ids and len(ids) == 100
    qids, texts = load_queries(f"{beir}/queries.jsonl")
    exact = plaid.maxsim(ColBERTEncoder(ck).encode_queries(texts), docs)
    ranked = read_run(str(run))
    top1 = [max(ranked[q], key=ranked[q].get) for q in qids]
    assert np.mean([t == ids[int(e.argmax())] for t, e in zip(top1, exact)]) >= 0.8

    if layout == "stanford":  # the saved bundle is an input of its own
        code, _, err = run_cli(capsys, "index", tmp_path / "idx2", "--embeddings", emb, "--quiet", "--codec", "scalar")
        assert code == 0, err
        assert plaid.Index(str(tmp_path / "idx2")).num_tokens == docs.num_tokens


# -- bad input ------------------------------------------------------------------------------------
def _write_bundle(folder, docs, ids, doclens=None):
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "doc_embeddings.f16.npy"), np.concatenate(docs).astype(np.float16))
    np.save(os.path.join(folder, "doclens.npy"), np.array(doclens or [len(d) for d in docs], np.int32))
    with open(os.path.join(folder, "doc_ids.txt"), "w") as f:
        f.writelines(f"{x}\n" for x in ids)
    return str(folder)


@pytest.fixture(scope="module")
def small_cli(tmp_path_factory, small_corpus):
    """A bundle of the synthetic corpus (600 docs, dim 64, queries too) and its index built by the CLI."""
    docs, queries = small_corpus
    root = tmp_path_factory.mktemp("cli")
    bundle = _write_bundle(root / "bundle", docs, [f"doc-{i}" for i in range(len(docs))])
    np.save(root / "bundle" / "query_embeddings.f16.npy", np.concatenate(queries).astype(np.float16))
    np.save(root / "bundle" / "query_lens.npy", np.array([len(q) for q in queries], np.int32))
    (root / "bundle" / "query_ids.txt").write_text("".join(f"q{i}\n" for i in range(len(queries))))
    idx = str(root / "idx")
    assert main(["index", idx, "--embeddings", bundle, "--pq-m", "16", "--quiet"]) == 0
    return root, bundle, idx


def test_small_bundle_search_and_overwrite(capsys, small_cli, tmp_path):
    root, bundle, idx = small_cli
    run = tmp_path / "run.trec"
    code, _, err = run_cli(capsys, "search", idx, "--query-embeddings", bundle, "--output", run, "--quiet")
    assert code == 0, err
    first = open(run).readline().split()
    assert first[0] == "q0" and first[2].startswith("doc-")
    code, _, err = run_cli(capsys, "search", idx, "--query-embeddings", bundle, "--output", run, "--quiet")
    assert_input_error(code, err, "exists; pass --overwrite")
    code, _, err = run_cli(capsys, "search", idx, "--query-embeddings", bundle, "--output", run, "--quiet",
                           "--overwrite", "--k", 5, "--ncells", 1, "--ndocs", 64, "--centroid-score-threshold", 0.3)
    assert code == 0, err
    assert len(open(run).readlines()) == 5 * 30
    code, out, _ = run_cli(capsys, "search", idx, "--query-embeddings", bundle, "--quiet", "--k", 2)  # to stdout
    assert code == 0 and len(out.splitlines()) == 60
    code, _, err = run_cli(capsys, "index", idx, "--embeddings", bundle, "--quiet")
    assert_input_error(code, err, "not empty; pass --overwrite")


def test_bad_bundles(capsys, small_cli, small_corpus, tmp_path):
    docs, _ = small_corpus
    bad = _write_bundle(tmp_path / "b1", docs[:10], [f"d{i}" for i in range(10)],
                        doclens=[len(d) for d in docs[:10]][:-1] + [1])
    code, _, err = run_cli(capsys, "index", tmp_path / "i1", "--embeddings", bad, "--quiet")
    assert_input_error(code, err, "sum to")
    assert not os.path.exists(tmp_path / "i1")
    dup = _write_bundle(tmp_path / "b2", docs[:10], ["a"] * 2 + [f"d{i}" for i in range(8)])
    code, _, err = run_cli(capsys, "index", tmp_path / "i2", "--embeddings", dup, "--quiet")
    assert_input_error(code, err, "not unique")
    code, _, err = run_cli(capsys, "index", tmp_path / "i3", "--embeddings", tmp_path / "nowhere", "--quiet")
    assert_input_error(code, err, "bundle not found")
    code, _, err = run_cli(capsys, "search", tmp_path / "nowhere", "--query-embeddings", bad)
    assert_input_error(code, err, "no index at")
    code, _, err = run_cli(capsys, "search", small_cli[2], "--query-embeddings", bad)
    assert_input_error(code, err, "has no query_embeddings.f16.npy")


def test_bad_text_inputs(capsys, tmp_path, small_cli):
    beir = write_beir(str(tmp_path / "beir"), [("a", "", "x"), ("b", "", "y")], [("q", "x")], [("q", "a", 1)])
    with open(f"{beir}/corpus.jsonl", "a") as f:
        f.write('{"_id": "c", "text": "unterminated\n')
    code, _, err = run_cli(capsys, "index", tmp_path / "i", "--corpus", f"{beir}/corpus.jsonl", "--checkpoint", beir)
    assert_input_error(code, err, "corpus.jsonl:3: not valid JSON")
    with open(f"{beir}/corpus.jsonl", "w") as f:
        f.write('{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    code, _, err = run_cli(capsys, "index", tmp_path / "i", "--corpus", f"{beir}/corpus.jsonl", "--checkpoint", beir)
    assert_input_error(code, err, "corpus.jsonl:2: duplicate document id 'a'")
    code, _, err = run_cli(capsys, "index", tmp_path / "i", "--corpus", f"{beir}/corpus.jsonl", "--checkpoint", beir,
                           "--save-embeddings", tmp_path / "beir")
    assert_input_error(code, err, "embeddings folder")  # refused before anything is encoded
    assert not os.path.exists(tmp_path / "i")
    with open(f"{beir}/queries.jsonl", "w") as f:
        f.write('{"id": "q", "text": "x"}\n')
    idx = small_cli[2]
    code, _, err = run_cli(capsys, "search", idx, "--queries", f"{beir}/queries.jsonl", "--checkpoint", beir)
    assert_input_error(code, err, "queries.jsonl:1: missing field '_id'")
    code, _, err = run_cli(capsys, "index", tmp_path / "i", "--corpus", f"{beir}/corpus.jsonl", "--checkpoint",
                           tmp_path / "no-such-model")
    assert_input_error(code, err, "corpus.jsonl:2: duplicate")  # the corpus is read before the model
    with open(f"{beir}/corpus.jsonl", "w") as f:
        f.write('{"_id": "a", "text": "x"}\n')
    code, _, err = run_cli(capsys, "index", tmp_path / "i", "--corpus", f"{beir}/corpus.jsonl", "--checkpoint",
                           tmp_path / "no-such-model")
    assert_input_error(code, err, "checkpoint folder not found")
    assert not os.path.exists(tmp_path / "i")


def test_bad_runs_and_qrels(capsys, small_cli, tmp_path):
    root, bundle, idx = small_cli
    run = tmp_path / "run.trec"
    run.write_text("q0 Q0 doc-1 1 3.0 t\nq0 Q0 doc-999999 2 2.0 t\nq1 Q0 doc-2 1 1.0 t\n")
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("q0\tdoc-1\t1\nq1\tdoc-2\t1\nq7\tdoc-3\t1\nq1\tnot-a-doc\t1\n")
    code, _, err = run_cli(capsys, "evaluate", "--run", run, "--qrels", qrels, "--index", idx)
    assert_input_error(code, err, "1 document id(s) that are not in the index")
    run.write_text("q0 Q0 doc-1 1 3.0 t\nq1 Q0 doc-2 1 1.0 t\n")
    code, out, err = run_cli(capsys, "evaluate", "--run", run, "--qrels", qrels, "--index", idx)
    assert code == 0, err
    assert "qrels name 1 document id(s) that are not in the index" in err
    assert "qrels name 1 query that the run does not have" in err
    assert "RR@10    1.0000" in out
    run.write_text("q0 Q0 doc-1 one 3.0 t\n")
    code, _, err = run_cli(capsys, "evaluate", "--run", run, "--qrels", qrels)
    assert_input_error(code, err, "run.trec:1: rank 'one'")
    run.write_text("q0 Q0 doc-1 1 3.0 t\n")
    code, _, err = run_cli(capsys, "evaluate", "--run", run, "--qrels", qrels, "--metrics", "nDCG@x")
    assert_input_error(code, err, "unknown metric 'nDCG@x'")
    code, _, err = run_cli(capsys, "evaluate", "--run", run, "--qrels", tmp_path / "none.tsv")
    assert_input_error(code, err, "qrels file not found")


@pytest.mark.parametrize("argv,match", [
    (["index", "x"], "give either an embeddings bundle or a corpus"),
    (["index", "x", "--embeddings", "a", "--corpus", "b"], "not both"),
    (["index", "x", "--corpus", "b"], "needs a ColBERT checkpoint"),
    (["search", "x", "--k", "0"], "expected a positive integer"),
    (["search"], "the following arguments are required: INDEX_DIR"),
    (["evaluate", "--run", "r"], "the following arguments are required: --qrels"),
    (["index", "x", "--bogus"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice"),
])
def test_usage_errors(capsys, tmp_path, monkeypatch, argv, match):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *argv)
    assert_input_error(code, err, match)


def test_python_m_plaid_and_build_script(small_cli, tmp_path):
    """The entry points as a user runs them: exit codes and one-line errors, no traceback."""
    root, bundle, idx = small_cli
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "plaid", "info", idx], capture_output=True, text=True, env=env)
    assert p.returncode == 0 and "documents" in p.stdout and "600" in p.stdout, p.stderr
    p = subprocess.run([sys.executable, "-m", "plaid", "info", str(tmp_path / "missing")], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no index at" in p.stderr, p.stderr
    script = os.path.join(REPO, "scripts", "build_index.py")
    p = subprocess.run([sys.executable, script, str(tmp_path / "idx"), "--embeddings", bundle, "--pq-m", "16",
                        "--quiet"], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert plaid.Index(str(tmp_path / "idx")).doc_ids[:2] == ["doc-0", "doc-1"]
