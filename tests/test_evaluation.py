"""BEIR/TREC readers and writers, and metrics through ir-measures."""
import io
import os

import pytest

import plaid
from conftest import MSMARCO, requires_msmarco
from plaid.evaluation import (evaluate, format_table, load_corpus, load_qrels, load_queries, read_run, save_run,
                              write_run)

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


# -- run ids that a TREC run cannot hold ------------------------------------------------------------
@pytest.mark.parametrize("qids,docs,match", [
    (["q1"], [["d 1"]], r"document id 'd 1' \(query 'q1', rank 1\) is empty or contains whitespace"),
    (["q1"], [["d1", "d\t2"]], r"document id 'd\\t2' \(query 'q1', rank 2\)"),
    (["q1"], [["d1", None, "d\u00a03"]], r"document id 'd\\xa03' \(query 'q1', rank 2\)"),  # no-break space
    (["q1"], [[""]], r"document id '' \(query 'q1', rank 1\) is empty"),
    (["q 1"], [["d1"]], r"query id 'q 1' \(query 0\) is empty or contains whitespace"),
    (["q1", ""], [["d1"], ["d2"]], r"query id '' \(query 1\)"),
    (["q1", "q1"], [["d1"], ["d2"]], r"query id 'q1' is given twice \(queries 0 and 1\)"),
])
def test_write_run_refuses_ids_that_cannot_be_written(tmp_path, qids, docs, match):
    scores = [[1.0] * len(row) for row in docs]
    f = io.StringIO()
    with pytest.raises(plaid.InvalidInputError, match=match):
        write_run(f, qids, docs, scores)
    assert f.getvalue() == ""  # checked before the first line: no partial run on stdout
    path = tmp_path / "run.trec"
    path.write_text("old\n")
    with pytest.raises(plaid.InvalidInputError, match=r"cannot write the run .*run.trec: " + match):
        save_run(str(path), qids, docs, scores)
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["run.trec"]  # untouched, no temporary left


def test_write_run_refuses_scores_and_shapes_it_cannot_write():
    with pytest.raises(plaid.InvalidInputError, match=r"document 'd1' \(query 'q1', rank 1\) has the score nan"):
        write_run(io.StringIO(), ["q1"], [["d1"]], [[float("nan")]])
    with pytest.raises(plaid.InvalidInputError, match="2 query ids for 1 rows"):
        write_run(io.StringIO(), ["q1", "q2"], [["d1"]], [[1.0]])
    with pytest.raises(plaid.InvalidInputError, match="query 'q1': 2 document ids for 1 scores"):
        write_run(io.StringIO(), ["q1"], [["d1", "d2"]], [[1.0]])
    with pytest.raises(plaid.InvalidInputError, match="run tag 'a b'"):
        write_run(io.StringIO(), ["q1"], [["d1"]], [[1.0]], tag="a b")
    f = io.StringIO()  # ints are ids too, written as decimals; a missing hit's score is not looked at
    assert write_run(f, [7], [[12, None]], [[1.5, float("-inf")]]) == 1
    assert f.getvalue() == "7 Q0 12 1 1.500000 plaid\n"


# -- qrels header detection -------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["query-id\tcorpus-id\tscore", "QUERY-ID\tCorpus-Id\tScore", "qid\tdocid\trel",
                                    "query_id corpus_id relevance", "qid iter docno rel", "topic 0 docid relevance"])
def test_qrels_headers_that_are_skipped(tmp_path, header):
    line = "1 d1 2" if len(header.split()) == 3 else "1 0 d1 2"
    assert load_qrels(_write(tmp_path, "q.tsv", f"{header}\n{line}\n")) == {"1": {"d1": 2}}


@pytest.mark.parametrize("text,match", [
    # a first line with a non-integer grade that is not a header was dropped silently before
    ("1\td1\t1.5\n1\td2\t1\n", r"q.tsv:1: relevance '1.5' is not an integer, and the line is not a header"),
    ("1\td1\tx\n1\td2\t1\n", r"q.tsv:1: relevance 'x' is not an integer, and the line is not a header"),
    ("query-id\td1\tscore\n1\td2\t1\n", r"q.tsv:1: relevance 'score' is not an integer"),  # d1 is data
    ("q1 0 d1 relevant\n", r"q.tsv:1: relevance 'relevant' is not an integer"),
    ("\n\n1\td1\tnan\n", r"q.tsv:3: relevance 'nan' is not an integer, and the line is not a header"),
    ("1\td1\t1\nquery-id\tcorpus-id\tscore\n", r"q.tsv:2: relevance 'score' is not an integer"),  # not first
    ("query-id\tcorpus-id\tscore\n", "no judgements"),
    (b"1\td1\t1\n1\td2\t1\n1\td\xe93\t1\n", r"q.tsv:3: not UTF-8 text \(byte 0xe9 at column 4\)"),
])
def test_qrels_never_drop_a_judgement(tmp_path, text, match):
    p = tmp_path / "q.tsv"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(plaid.InvalidInputError, match=match):
        load_qrels(str(p))


def test_qrels_integer_valued_grades_and_crlf(tmp_path):
    p = _write(tmp_path, "q.tsv", "1\td1\t1.0\r\n1\td2\t-1\r\n")
    assert load_qrels(p) == {"1": {"d1": 1, "d2": -1}}


def test_text_readers_name_the_line_that_is_not_utf8(tmp_path):
    p = tmp_path / "run.trec"
    p.write_bytes(b"q1 Q0 d1 1 2.5 t\n\xff\xfe\n")
    with pytest.raises(plaid.InvalidInputError, match=r"run.trec:2: not UTF-8 text \(byte 0xff at column 1\)"):
        read_run(str(p))
    p = tmp_path / "corpus.jsonl"
    p.write_bytes(b'{"_id": "a", "text": "x"}\n{"_id": "b", "text": "\xc3("}\n')
    with pytest.raises(plaid.InvalidInputError, match=r"corpus.jsonl:2: not UTF-8 text"):
        load_corpus(str(p))
    p.write_bytes(b'\xef\xbb\xbf{"_id": "a", "text": "x"}\n' + b"[" * 100000 + b"\n")  # BOM; absurd nesting
    with pytest.raises(plaid.InvalidInputError, match=r"corpus.jsonl:2: not usable JSON"):
        load_corpus(str(p))
    p = tmp_path / "queries.tsv"
    p.write_bytes(b"q1\thello\r\nq2\t\x80\n")
    with pytest.raises(plaid.InvalidInputError, match=r"queries.tsv:2: not UTF-8 text"):
        load_queries(str(p))
    p.write_bytes(b"q1\thello\r\n")
    assert load_queries(str(p)) == (["q1"], ["hello"])


# -- metric names ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,match", [
    ("P@0", r"invalid metric 'P@0': the cutoff \(@k\) must be a positive integer \(1 to 2147483647\), got 0"),
    ("nDCG@0", r"invalid metric 'nDCG@0': the cutoff"),
    ("P(cutoff=0)", r"invalid metric 'P\(cutoff=0\)': the cutoff"),
    ("P@-1", r"unknown metric 'P@-1' .*: the cutoff after '@' must be a positive integer, got '-1'"),
    ("nDCG@x", r"unknown metric 'nDCG@x' .*got 'x'"),
    ("R@", r"unknown metric 'R@' .*got ''"),
    ("nDCG@10.5", r"invalid metric 'nDCG@10.5': the cutoff .* got 10.5"),
    ("P@2147483648", r"invalid metric 'P@2147483648': the cutoff"),
    ("P(rel=0)@5", r"invalid metric 'P\(rel=0\)@5': rel .* must be a positive integer"),
    ("P", r"invalid metric 'P': P needs a cutoff \(e.g. P@10\)"),
    ("nDCG(foo=1)@10", r"invalid metric 'nDCG\(foo=1\)@10': nDCG takes no parameter foo"),
    ("Bogus", r"unknown metric 'Bogus'"),
    ("ndcg@10", r"unknown metric 'ndcg@10'"),
    ("", r"empty metric name ''"),
])
def test_bad_metric_names_are_refused_naming_them(name, match):
    from plaid.evaluation import parse_metrics

    with pytest.raises(plaid.InvalidInputError, match=match):
        parse_metrics(["nDCG@10", name])
    if "@0" in name or "=0" in name:
        return  # would abort this process inside pytrec_eval if unchecked: test_cli_errors.py runs them apart
    with pytest.raises(plaid.InvalidInputError, match=match):  # evaluate checks before ir-measures computes
        evaluate({"q1": {"d1": 1.0}}, {"q1": {"d1": 1}}, [name])


def test_good_metric_names():
    from plaid.evaluation import parse_metrics

    _, measures = parse_metrics(["nDCG@10", "RR@10", "R@100", "P(rel=2)@5", "AP", "IPrec@0.5", "P@2147483647"])
    assert [str(m) for m in measures][:4] == ["nDCG@10", "RR@10", "R@100", "P(rel=2)@5"]
    assert [str(m) for m in parse_metrics("nDCG@10")[1]] == ["nDCG@10"]  # one name, not its characters
    with pytest.raises(plaid.InvalidInputError, match="no metrics given"):
        parse_metrics([])
