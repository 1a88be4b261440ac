"""Every failure of every ``plaid`` subcommand: exit code 2 and exactly one line on stderr, never a
traceback or an abort. Most cases run ``plaid.cli.main`` in this process; those that could abort
the interpreter (pytrec_eval on a cutoff of 0) or that check the real process (``python -m
plaid``) run in a subprocess."""
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import plaid
from conftest import REPO, SMALL_INDEXER
from plaid.cli import main

ENV = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, command, match):
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, err  # exactly one line, nothing else on stderr
    assert lines[0].startswith(f"plaid {command}: error: "), lines[0]
    assert match in lines[0], lines[0]


def run_process(*argv, code=None):
    """``python -m plaid argv`` (or ``python -c code argv``): the finished process."""
    cmd = [sys.executable, "-c", code] if code else [sys.executable, "-m", "plaid"]
    return subprocess.run(cmd + [str(a) for a in argv], capture_output=True, text=True, env=ENV, timeout=120)


@pytest.fixture(scope="module")
def env(tmp_path_factory, mini_corpus):
    """Paths for the cases below: a bundle (documents and queries), its index and run, qrels, bad
    files, and damaged copies of the index."""
    docs, queries = mini_corpus
    root = tmp_path_factory.mktemp("cli-errors")
    bundle = root / "bundle"
    bundle.mkdir()
    np.save(bundle / "doc_embeddings.f16.npy", np.concatenate(docs).astype(np.float16))
    np.save(bundle / "doclens.npy", np.array([len(d) for d in docs], np.int32))
    (bundle / "doc_ids.txt").write_text("".join(f"m{i}\n" for i in range(len(docs))))
    np.save(bundle / "query_embeddings.f16.npy", np.concatenate(queries).astype(np.float16))
    np.save(bundle / "query_lens.npy", np.array([len(q) for q in queries], np.int32))
    (bundle / "query_ids.txt").write_text("".join(f"q{i}\n" for i in range(len(queries))))
    idx = root / "idx"
    assert main(["index", str(idx), "--embeddings", str(bundle), "--pq-m", "16", "--quiet"]) == 0
    run = root / "run.trec"
    assert main(["search", str(idx), "--query-embeddings", str(bundle), "--output", str(run), "--quiet"]) == 0
    (root / "qrels.tsv").write_text("q0\tm1\t1\nq1\tm2\t1\n")
    (root / "qrels-1.5.tsv").write_text("q0\tm1\t1.5\nq1\tm2\t1\n")
    (root / "binary.bin").write_bytes(bytes(range(128, 256)) + bytes(range(128)) * 4)
    (root / "empty.txt").write_bytes(b"")
    (root / "nested.jsonl").write_text("[" * 100000 + "\n")
    (root / "adir").mkdir()
    for name in ("garbage-bundle", "empty-doclens", "bad-ids", "dim0"):
        shutil.copytree(bundle, root / name)
    (root / "garbage-bundle" / "doc_embeddings.f16.npy").write_bytes(b"\x93NUMPY garbage" * 10)
    (root / "empty-doclens" / "doclens.npy").write_bytes(b"")
    (root / "bad-ids" / "doc_ids.txt").write_bytes(b"m0\n\xff\xfe\n")
    np.save(root / "dim0" / "doc_embeddings.f16.npy", np.zeros((sum(len(d) for d in docs), 0), np.float16))
    shutil.copytree(idx, root / "truncated")
    victim = next(f for f in sorted(os.listdir(idx)) if f.startswith("ivf."))
    with open(root / "truncated" / victim, "r+b") as f:
        f.truncate(100)
    shutil.copytree(idx, root / "bad-manifest")
    (root / "bad-manifest" / "manifest.json").write_text("garbage{")
    # an index built from Python with document ids a TREC run cannot hold
    spaced = root / "spaced"
    plaid.Indexer(**SMALL_INDEXER).build(str(spaced), docs, doc_ids=[f"m {i}" for i in range(len(docs))])
    paths = {p.name.split(".")[0].replace("-", "_"): str(p) for p in root.iterdir()}
    paths.update(root=str(root), victim=victim)
    return paths


# (command line with {name} for the paths of env, text the one line must hold)
CASES = [
    # index
    ("index {root}/new --embeddings {root}/nowhere", "embeddings bundle not found"),
    ("index {root}/new --embeddings {binary}", "is not a directory"),
    ("index {root}/new --embeddings {garbage_bundle}", "cannot read doc_embeddings.f16.npy"),
    ("index {root}/new --embeddings {empty_doclens}", "cannot read doclens.npy"),
    ("index {root}/new --embeddings {bad_ids}", "doc_ids.txt:2: not UTF-8 text (byte 0xff at column 1)"),
    ("index {root}/new --embeddings {dim0}", "with dim > 0, got shape"),  # was a SIGFPE in k-means
    ("index {binary} --embeddings {bundle}", "exists and is not a directory"),
    ("index {binary}/sub --embeddings {bundle}", "Not a directory"),
    ("index {root}/new --embeddings {bundle} --seed -1", "argument --seed: expected an integer from 0 to"),
    ("index {root}/new --embeddings {bundle} --seed 100000000000000000000", "argument --seed"),
    ("index {root}/new --embeddings {bundle} --device bogus", "unknown device 'bogus'"),
    ("index {root}/new --embeddings {bundle} --pq-m 700", "must be between 1 and the dimension"),
    ("index {root}/new --embeddings {bundle} --preset tiny", "invalid choice: 'tiny'"),
    ("index {root}/new --embeddings {bundle} --pool-factor 0", "argument --pool-factor: expected a number from 1"),
    ("index {root}/new --embeddings {bundle} --pool-factor nan", "argument --pool-factor: expected a number from 1"),
    ("index {root}/new --embeddings {bundle} --pool-factor x", "argument --pool-factor: expected a number from 1"),
    ("index {root}/new --embeddings {bundle} --search-depth 0", "argument --search-depth: expected a positive integer"),
    ("index {root}/new --embeddings {bundle} --search-depth 65", "search_depth must be an integer in [1, 64], got 65"),
    ("index {root}/new --corpus {adir} --checkpoint {adir}", "corpus path is a directory"),
    ("index {root}/new --corpus {empty} --checkpoint {adir}", "the corpus holds no documents"),
    ("index {root}/new --corpus {binary} --checkpoint {adir}", "binary.bin:1: not UTF-8 text"),
    ("index {root}/new --corpus {nested} --checkpoint {adir}", "nested.jsonl:1: not usable JSON"),
    # search
    ("search {root}/nowhere --query-embeddings {bundle}", "no index at"),
    ("search {bad_manifest} --query-embeddings {bundle}", "manifest.json is not valid JSON"),
    ("search {truncated} --query-embeddings {bundle}", "is truncated"),
    ("search {idx} --query-embeddings {adir}", "has no query_embeddings.f16.npy"),
    ("search {idx} --query-embeddings {bundle} --k 0", "argument --k: expected a positive integer, got '0'"),
    ("search {idx} --query-embeddings {bundle} --k 1e3", "argument --k: expected a positive integer"),
    ("search {idx} --query-embeddings {bundle} --centroid-score-threshold nan", "expected a finite number"),
    ("search {idx} --query-embeddings {bundle} --device bogus", "unknown device 'bogus'"),
    ("search {idx} --query-embeddings {bundle} --output {root}/missing/run.trec", "does not exist"),
    ("search {idx} --query-embeddings {bundle} --output {adir}", "is a directory"),
    ("search {idx} --queries {binary} --checkpoint {adir}", "binary.bin:1: not UTF-8 text"),
    ("search {idx} --queries {empty} --checkpoint {adir}", "no queries"),
    ("search {spaced} --query-embeddings {bundle}", "document id 'm "),
    ("search {spaced} --query-embeddings {bundle} --output {root}/spaced.trec", "cannot write the run"),
    # evaluate
    ("evaluate --run {root}/nowhere.trec --qrels {qrels}", "run file not found"),
    ("evaluate --run {adir} --qrels {qrels}", "run path is a directory"),
    ("evaluate --run {binary} --qrels {qrels}", "binary.bin:1: not UTF-8 text (byte 0x80 at column 1)"),
    ("evaluate --run {empty} --qrels {qrels}", "the run is empty"),
    ("evaluate --run {run} --qrels {qrels_1}", "qrels-1.5.tsv:1: relevance '1.5' is not an integer"),
    ("evaluate --run {run} --qrels {binary}", "binary.bin:1: not UTF-8 text"),
    ("evaluate --run {run} --qrels {qrels} --index {root}/nowhere", "no index at"),
    ("evaluate --run {run} --qrels {qrels} --metrics nDCG@10 P@x", "unknown metric 'P@x'"),
    ("evaluate --run {run} --qrels {qrels} --metrics nDCG@10.5", "invalid metric 'nDCG@10.5'"),
    ("evaluate --run {run} --qrels {qrels} --metrics Bogus", "unknown metric 'Bogus'"),
    # info and verify
    ("info {root}/nowhere", "no index at"),
    ("info {binary}", "no index at"),
    ("info {adir}", "no manifest.json"),
    ("info {bad_manifest} --json", "manifest.json is not valid JSON"),
    ("info {truncated} --verify", "index verification failed: {victim}: size 100 bytes"),
    ("verify {bad_manifest}", "manifest.json is not valid JSON"),
    ("verify {truncated}", "index verification failed (1 problem(s))"),
    ("verify {adir}", "no manifest.json"),
]


@pytest.mark.parametrize("line,match", CASES, ids=[c[0].split(" --")[0][:40] + " " + c[1][:25] for c in CASES])
def test_every_failure_is_one_line(capsys, env, line, match):
    argv = [part.format(**env) for part in line.split()]
    code, out, err = run_cli(capsys, *argv, "--quiet")
    assert_one_line_error(code, err, argv[0], match.format(**env))
    # without --quiet, progress notes may come first: the error is still one line, and the last
    code, out, err = run_cli(capsys, *argv)
    *notes, last = err.splitlines()
    assert_one_line_error(code, last + "\n", argv[0], match.format(**env))
    assert all(n.startswith("plaid: ") for n in notes), err
    assert not os.path.exists(os.path.join(env["root"], "new"))  # a failed index leaves nothing behind
    if argv[0] == "search":
        assert out == ""  # not a partial run on stdout either
    if argv[0] == "verify" and "truncated" in line:
        assert f"{env['victim']}: size 100 bytes" in out  # the problems themselves, on stdout


@pytest.mark.parametrize("metric", ["P@0", "nDCG@0", "R@0", "AP@0", "Success@0", "P(cutoff=0)", "P@-1", ""])
def test_metrics_that_would_abort_pytrec_eval(env, metric):
    """A cutoff of 0 aborted the interpreter inside pytrec_eval (SIGABRT, exit 134, two lines of C)."""
    p = run_process("evaluate", "--run", env["run"], "--qrels", env["qrels"], "--metrics", metric)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.startswith("plaid evaluate: error: ") and repr(metric) in p.stderr, p.stderr
    assert p.stdout == ""


def test_huge_k_is_capped_to_the_index(capsys, env):
    """--k 10**13 allocated [nq, k] arrays (a MemoryError traceback); no query can have more hits
    than the index has documents, so the run is that of --k 120."""
    code, out, err = run_cli(capsys, "search", env["idx"], "--query-embeddings", env["bundle"], "--quiet",
                             "--k", 10**13)
    assert code == 0 and err == "", err
    rows = [line.split() for line in out.splitlines()]
    code, out_all, _ = run_cli(capsys, "search", env["idx"], "--query-embeddings", env["bundle"], "--quiet",
                               "--k", 120)
    assert code == 0 and out == out_all
    assert len(rows) == 6 * 120 and {r[0] for r in rows} == {f"q{i}" for i in range(6)}


def test_unexpected_exceptions_are_one_line_too(capsys, env, monkeypatch):
    import plaid.cli as cli

    def boom(args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setitem(cli._COMMANDS, "info", boom)
    code, _, err = run_cli(capsys, "info", env["idx"])
    assert code == 2 and err == "plaid info: internal error: RuntimeError: boom | second line (please report it)\n"

    def oom(args):
        raise MemoryError()

    monkeypatch.setitem(cli._COMMANDS, "info", oom)
    code, _, err = run_cli(capsys, "info", env["idx"])
    assert code == 2 and err.startswith("plaid info: error: out of memory") and err.count("\n") == 1, err

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, "info", interrupted)
    code, out, err = run_cli(capsys, "info", env["idx"])
    assert code == 130 and out == "" and err == ""

    def closed_pipe(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli._COMMANDS, "info", closed_pipe)
    code, out, err = run_cli(capsys, "info", env["idx"])
    assert code == 141 and err == ""


def test_the_process_itself(env):
    """As a user runs it: a bug is one line and exit 2, Ctrl-C is exit 130 and silent, and a damaged
    index is one line; nothing else reaches the real stderr."""
    prologue = "import sys, plaid.cli as c\n"
    p = run_process("info", env["idx"], code=prologue + "c._COMMANDS['info'] = lambda a: {}['missing']\n"
                                                    "sys.exit(c.main(sys.argv[1:]))")
    assert p.returncode == 2 and p.stderr == "plaid info: internal error: KeyError: 'missing' (please report it)\n"
    p = run_process("info", env["idx"], code=prologue + "def f(a): raise KeyboardInterrupt\n"
                                                    "c._COMMANDS['info'] = f\nsys.exit(c.main(sys.argv[1:]))")
    assert p.returncode == 130 and p.stderr == "" and p.stdout == ""
    p = run_process("search", env["truncated"], "--query-embeddings", env["bundle"])
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "is truncated" in p.stderr, p.stderr


# -- logging ---------------------------------------------------------------------------------------
def test_notes_go_through_the_plaid_logger(capsys, env, monkeypatch, tmp_path):
    import plaid.cli as cli

    plaid_logger, root = logging.getLogger("plaid"), logging.getLogger()
    before = (list(plaid_logger.handlers), plaid_logger.level, plaid_logger.propagate, list(root.handlers), root.level)
    seen = []

    def command(args):  # what a library module does: a module logger under plaid.*, and a warning
        seen.append([h for h in plaid_logger.handlers if isinstance(h, cli._StderrHandler)])
        logging.getLogger("plaid.indexing.something").info("a note from the library")
        logging.getLogger("plaid.search.other").debug("not shown")
        import warnings

        warnings.warn(f"something odd {len(seen)}\nwith details")  # a new text each time: shown each time
        return 0

    monkeypatch.setitem(cli._COMMANDS, "info", command)
    for i in range(1, 4):  # repeated calls in one process: one handler each time, removed after
        code, out, err = run_cli(capsys, "info", env["idx"])
        assert code == 0 and out == ""
        assert err == f"plaid: a note from the library\nplaid: warning: something odd {i} | with details\n"
    assert [len(h) for h in seen] == [1, 1, 1]
    code, _, err = run_cli(capsys, "info", env["idx"], "--quiet")
    assert code == 0 and err == "plaid: warning: something odd 4 | with details\n"  # --quiet: WARNING and above
    after = (list(plaid_logger.handlers), plaid_logger.level, plaid_logger.propagate, list(root.handlers), root.level)
    assert after == before  # the root logger is never configured; the plaid logger is restored

    # the real commands' notes: the same "plaid: " lines
    monkeypatch.undo()
    code, _, err = run_cli(capsys, "search", env["idx"], "--query-embeddings", env["bundle"],
                           "--output", tmp_path / "run.trec")
    assert code == 0
    lines = err.splitlines()
    assert any(line.startswith("plaid: searched 6 queries (k=10)") for line in lines), err
    assert f"plaid: run written to {tmp_path / 'run.trec'}" in lines
    code, _, err = run_cli(capsys, "search", env["idx"], "--query-embeddings", env["bundle"],
                           "--output", tmp_path / "run2.trec", "--quiet")
    assert code == 0 and err == ""


def test_query_maxlen_beyond_the_model(capsys, env, checkpoints, tmp_path):
    """Queries are [MASK]-padded to --query-maxlen: past the transformer's 512 positions the model
    raised a RuntimeError (a traceback)."""
    queries = tmp_path / "queries.tsv"
    queries.write_text("q1\thello world\n")
    code, _, err = run_cli(capsys, "search", env["idx"], "--queries", queries, "--checkpoint", checkpoints["stanford"],
                           "--query-maxlen", 100000, "--quiet")
    assert_one_line_error(code, err, "search", "--query-maxlen 100000 exceeds the 512 positions")


def test_no_command_is_one_line(capsys):
    code, out, err = run_cli(capsys)
    assert code == 2 and out == ""
    assert err == "plaid: error: a command is required: index, search, evaluate, info, verify, upgrade (see plaid --help)\n"
