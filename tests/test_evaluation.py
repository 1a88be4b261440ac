"""BEIR/TREC readers and writers, and metrics through ir-measures."""
import io
import os

import pytest

import plaid
from conftest import MSMARCO, requires_msmarco
from plaid.evaluation import evaluate, format_table, load_corpus, load_qrels, load_queries, read_run, write_run

pytest.importorskip("ir_measures", reason="evaluation tests need ir-measures (the [test] extra)")


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_qrels_without_header_keep_their_first_line(tmp_path):
    p = _write(tmp_path, "q.tsv", "1\td1\t2\n1\td2\t0\n2\td3\t1\n")
    assert load_qrels(p) == {"1": {"d1": 2, "d2": 0}, "2": {"d3": 1}}


def test_qrels_with_beir_header_and_trec_format(tmp_path):
    beir = _write(tmp_path, "b.tsv", "query-id\tcorpus-id\tscore\n1\td1\t2\n")
    trec = _write(tmp_path, "t.txt", "1 0 d1 2\n1 0 d2 1\n")
    assert load_qrels(beir) == {"1": {"d1": 2}}
    assert load_qrels(trec) == {"1": {"d1": 2, "d2": 1}}


@pytest.mark.parametrize("text,match", [
    ("1\td1\t2\n1\td2\n", r"q.tsv:2: expected 3 fields"),
    ("1\td1\t2\n1\td2\tx\n", r"q.tsv:2: relevance 'x' is not an integer"),
    ("", "no judgements"),
])
def test_bad_qrels(tmp_path, text, match):
    with pytest.raises(plaid.InvalidInputError, match=match):
        load_qrels(_write(tmp_path, "q.tsv", text))


@requires_msmarco
def test_msmarco_qrels_first_line_is_data():
    qrels = load_qrels(os.path.join(MSMARCO, "qrels", "test.tsv"))
    assert sum(len(v) for v in qrels.values()) == 4102
    assert qrels["19335"]["1720389"] == 1  # the file's first line


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = _write(tmp_path, "corpus.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "b", "text": \n')
    with pytest.raises(plaid.InvalidInputError, match=r"corpus.jsonl:2: not valid JSON"):
        load_corpus(p)
    p = _write(tmp_path, "corpus.jsonl", '{"_id": "a", "text": "x"}\n\n{"_id": "b"}\n')
    with pytest.raises(plaid.InvalidInputError, match=r"corpus.jsonl:3: missing field 'text'"):
        load_corpus(p)
    p = _write(tmp_path, "corpus.jsonl", '{"_id": "a", "text": "x"}\n{"_id": "a", "text": "y"}\n')
    with pytest.raises(plaid.InvalidInputError, match=r"corpus.jsonl:2: duplicate document id 'a' \(first on line 1\)"):
        load_corpus(p)
    with pytest.raises(plaid.InvalidInputError, match="not found"):
        load_corpus(str(tmp_path / "missing.jsonl"))


def test_corpus_title_and_queries(tmp_path):
    p = _write(tmp_path, "corpus.jsonl", '{"_id": 7, "title": "T", "text": "x"}\n{"_id": "b", "title": "", "text": "y"}\n')
    assert load_corpus(p) == (["7", "b"], ["T x", "y"])
    q = _write(tmp_path, "queries.jsonl", '{"_id": "q1", "text": "hello"}\n')
    assert load_queries(q) == (["q1"], ["hello"])
    q = _write(tmp_path, "queries.tsv", "q1\thello world\n")
    assert load_queries(q) == (["q1"], ["hello world"])


def test_run_roundtrip_and_errors(tmp_path):
    f = io.StringIO()
    assert write_run(f, ["q1", "q2"], [["d1", "d2"], ["d3", None]], [[2.5, 1.0], [0.5, float("-inf")]], tag="t") == 3
    assert f.getvalue().splitlines()[0] == "q1 Q0 d1 1 2.500000 t"
    p = _write(tmp_path, "run.trec", f.getvalue())
    assert read_run(p) == {"q1": {"d1": 2.5, "d2": 1.0}, "q2": {"d3": 0.5}}
    with pytest.raises(plaid.InvalidInputError, match=r"run.trec:2: expected 'qid Q0 docid rank score tag'"):
        read_run(_write(tmp_path, "run.trec", "q1 Q0 d1 1 2.5 t\nq1 d2 2 1.0 t\n"))
    with pytest.raises(plaid.InvalidInputError, match="appears twice"):
        read_run(_write(tmp_path, "run.trec", "q1 Q0 d1 1 2.5 t\nq1 Q0 d1 2 1.0 t\n"))


def test_evaluate_left_out_queries_and_unknown_ids():
    import ir_measures

    qrels = {"q1": {"d1": 2, "d2": 1}, "q2": {"d3": 1}, "q9": {"d1": 1}}
    run = {"q1": {"d2": 3.0, "d1": 2.0, "d4": 1.0}, "q2": {"d4": 2.0, "d3": 1.0}, "q3": {"d1": 1.0}}
    with pytest.warns(UserWarning, match="qrels name 1 query that the run does not have"):
        res = evaluate(run, qrels, ["nDCG@10", "RR@10", "R@100"])
    # q3 (unjudged) and q9 (not in the run) are left out: the mean is over q1 and q2
    expected = ir_measures.calc_aggregate([ir_measures.parse_measure("nDCG@10")],
                                          {k: qrels[k] for k in ("q1", "q2")}, run)
    assert res["metrics"]["nDCG@10"] == pytest.approx(list(expected.values())[0])
    assert res["metrics"]["RR@10"] == pytest.approx((1 + 0.5) / 2)
    assert res["queries"] == 2 and res["unjudged_queries"] == 1
    assert "2 judged queries" in format_table(res)
    with pytest.raises(plaid.InvalidInputError, match="1 document id.*not in the index"):
        evaluate(run, {"q1": {"d1": 1}}, ["nDCG@10"], doc_ids=["d1", "d2", "d3"])
    with pytest.warns(UserWarning, match="qrels name 1 document id"):
        evaluate(run, {"q1": {"d1": 1, "zz": 1}}, ["nDCG@10"], doc_ids=["d1", "d2", "d3", "d4"])
    with pytest.raises(plaid.InvalidInputError, match="unknown metric"):
        evaluate(run, qrels, ["nope@@"])


@requires_msmarco
def test_exhaustive_reference_run_reproduces_the_readme():
    """The exact top-100 of msmarco-5k, evaluated here, gives the figures of its README."""
    run = {}
    with open(os.path.join(MSMARCO, "exact_top100.tsv")) as f:
        for line in f:
            qid, did, _rank, score = line.split()
            run.setdefault(qid, {})[did] = float(score)
    res = evaluate(run, load_qrels(os.path.join(MSMARCO, "qrels", "test.tsv")), ["nDCG@10", "RR@10", "R@100"])
    assert res["queries"] == 43
    assert res["metrics"]["nDCG@10"] == pytest.approx(0.8024, abs=5e-5)
    assert res["metrics"]["R@100"] == pytest.approx(0.8248, abs=5e-5)
    assert res["metrics"]["RR@10"] == pytest.approx(1.0)
