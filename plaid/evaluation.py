"""Offline evaluation: BEIR / TREC readers and writers, and metrics through ir-measures.

Formats
-------
* BEIR corpus ``corpus.jsonl``: one JSON object per line with ``_id``, ``text`` and an optional
  ``title``; the document text is ``title + " " + text`` when the title is not empty.
* BEIR queries ``queries.jsonl``: ``_id`` and ``text`` per line (a ``qid<TAB>text`` ``.tsv`` file
  is read too).
* qrels: BEIR ``query-id corpus-id score`` (tab separated, with or without a header line) or TREC
  ``qid iter docid rel``. The first line is a header only when it literally is one: its relevance
  field is not a number and every field is a known column name (see :data:`QRELS_HEADER_WORDS`;
  BEIR's ``query-id corpus-id score``). Any other line whose relevance is not an integer raises,
  so a judgement is never dropped (msmarco-5k's file, without a header, keeps its first line).
* run: TREC ``qid Q0 docid rank score tag``, one line per retrieved document. Query and document
  ids that cannot be written into one (empty, or containing whitespace, which would shift the
  columns) are refused by :func:`write_run` / :func:`save_run`, which name the id and its query.

Metrics are computed by ir-measures (``pip install 'plaid-engine[eval]'``), never by hand; names
are ir-measures names (``nDCG@10``, ``RR@10``, ``R@100``, ``P@5``, ``AP``...), checked by
:func:`parse_metrics` before ir-measures computes anything (a cutoff ``@0`` would abort the process
inside pytrec_eval). Queries without judgements are left out of the averages, as trec_eval does.

Every problem with an input file raises :class:`plaid.InvalidInputError` naming the file and,
where it applies, the line number (text files must be UTF-8: a line that is not raises too).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InvalidInputError

__all__ = [
    "read_jsonl",
    "load_corpus",
    "load_queries",
    "load_qrels",
    "read_run",
    "check_run",
    "write_run",
    "save_run",
    "evaluate",
    "parse_metrics",
    "format_table",
    "DEFAULT_METRICS",
    "QRELS_HEADER_WORDS",
    "MAX_METRIC_PARAM",
]

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@100")

#: Column names that make a qrels file's first line a header, by column (case-insensitive). The
#: line is a header only if its relevance field is one of "grade" and each other field is one of
#: its column's words: BEIR's ``query-id corpus-id score``, ``qid docid rel``, TREC's
#: ``qid iter docno rel``... Anything else is data, and must parse as a judgement.
QRELS_HEADER_WORDS = {
    "query": frozenset({"query-id", "query_id", "queryid", "qid", "query", "topic", "topic-id", "topic_id"}),
    "iter": frozenset({"iter", "iteration", "q0", "0", "unused"}),
    "doc": frozenset({"corpus-id", "corpus_id", "corpusid", "doc-id", "doc_id", "docid", "docno", "doc",
                      "document", "document-id", "document_id", "pid", "passage-id", "passage_id"}),
    "grade": frozenset({"score", "rel", "relevance", "grade", "label", "judgment", "judgement", "qrel"}),
}

#: Largest metric cutoff (``@k``) or ``rel`` level :func:`parse_metrics` accepts (a C int in trec_eval).
MAX_METRIC_PARAM = 2**31 - 1

Qrels = Dict[str, Dict[str, int]]
Run = Dict[str, Dict[str, float]]


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise InvalidInputError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise InvalidInputError(f"{what} path is a directory, expected a file: {path}")


def _lines(path: str, what: str) -> Iterator[Tuple[int, str]]:
    """Yield ``(line_number, line)`` of a UTF-8 text file (``\\r\\n`` read as ``\\n``).

    Decoded line by line, so that a line that is not UTF-8 (a binary file, another encoding) raises
    :class:`InvalidInputError` with its own number.
    """
    _check_file(path, what)
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidInputError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                        f"{e.start + 1}); is this the {what} file?") from None
            if n == 1 and line.startswith("\ufeff"):  # a UTF-8 byte order mark
                line = line[1:]
            if line.endswith("\r\n"):
                line = line[:-2] + "\n"
            yield n, line


def read_jsonl(path: str, fields: Sequence[str], what: str = "JSONL") -> Iterator[Tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Raises :class:`InvalidInputError` ``"<path>:<line>: ..."`` for a line that does not parse, is not
    a JSON object, or lacks one of ``fields``.
    """
    for n, line in _lines(path, what):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of 5000 digits, [[[[... nested too deep
            raise InvalidInputError(f"{path}:{n}: not usable JSON ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else 'nested too deeply'})") from None
        if not isinstance(obj, dict):
            raise InvalidInputError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
        for field in fields:
            if field not in obj:
                raise InvalidInputError(f"{path}:{n}: missing field {field!r}")
        yield n, obj


def _str_id(value, path: str, n: int) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InvalidInputError(f"{path}:{n}: '_id' must be a string, got {value!r}")
    value = str(value)
    if not value or any(c.isspace() for c in value):
        raise InvalidInputError(f"{path}:{n}: '_id' {value!r} is empty or contains whitespace "
                                "(it could not be written to a TREC run)")
    return value


def load_corpus(path: str) -> Tuple[List[str], List[str]]:
    """Read a BEIR ``corpus.jsonl``: (ids, texts), in file order.

    text = ``title + " " + text`` when ``title`` is present and not empty. Duplicate ids raise.
    """
    ids, texts, seen = [], [], {}
    for n, obj in read_jsonl(path, ("_id", "text"), "corpus"):
        did = _str_id(obj["_id"], path, n)
        if did in seen:
            raise InvalidInputError(f"{path}:{n}: duplicate document id {did!r} (first on line {seen[did]})")
        seen[did] = n
        text, title = obj["text"], obj.get("title") or ""
        if not isinstance(text, str) or not isinstance(title, str):
            raise InvalidInputError(f"{path}:{n}: 'text' and 'title' must be strings")
        ids.append(did)
        texts.append(f"{title} {text}" if title.strip() else text)
    if not ids:
        raise InvalidInputError(f"{path}: the corpus holds no documents")
    return ids, texts


def load_queries(path: str) -> Tuple[List[str], List[str]]:
    """Read BEIR ``queries.jsonl`` (``_id``, ``text``) or a ``qid<TAB>text`` TSV: (ids, texts)."""
    ids, texts, seen = [], [], {}
    if path.endswith((".tsv", ".txt")):
        for n, line in _lines(path, "queries"):
            if not line.strip():
                continue
            parts = line.rstrip("\n").split("\t", 1)
            if len(parts) != 2:
                raise InvalidInputError(f"{path}:{n}: expected 'query_id<TAB>text'")
            qid, text = _str_id(parts[0].strip(), path, n), parts[1]
            if qid in seen:
                raise InvalidInputError(f"{path}:{n}: duplicate query id {qid!r} (first on line {seen[qid]})")
            seen[qid] = n
            ids.append(qid)
            texts.append(text)
    else:
        for n, obj in read_jsonl(path, ("_id", "text"), "queries"):
            qid = _str_id(obj["_id"], path, n)
            if qid in seen:
                raise InvalidInputError(f"{path}:{n}: duplicate query id {qid!r} (first on line {seen[qid]})")
            if not isinstance(obj["text"], str):
                raise InvalidInputError(f"{path}:{n}: 'text' must be a string")
            seen[qid] = n
            ids.append(qid)
            texts.append(obj["text"])
    if not ids:
        raise InvalidInputError(f"{path}: no queries")
    return ids, texts


def _int(s: str) -> Optional[int]:
    try:
        return int(s)
    except ValueError:
        try:
            f = float(s)
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def _is_header(parts: List[str]) -> bool:
    """Whether a qrels line is a header: every field a known column name (:data:`QRELS_HEADER_WORDS`)."""
    cols = ("query", "doc", "grade") if len(parts) == 3 else ("query", "iter", "doc", "grade")
    return all(p.lower() in QRELS_HEADER_WORDS[c] for p, c in zip(parts, cols))


def load_qrels(path: str) -> Qrels:
    """Read BEIR (3 columns, optional header) or TREC (4 columns) qrels: {qid: {docid: relevance}}.

    The first non-blank line is a header only when it literally is one: each field is a known
    column name of its column (case-insensitive, :data:`QRELS_HEADER_WORDS`), e.g. BEIR's
    ``query-id corpus-id score`` or ``qid iter docno rel``; its relevance field is then not a
    number. Every other line is a judgement: a relevance that is not an integer (``1.0`` is one)
    raises :class:`InvalidInputError` with the file and line number, so none is ever dropped.
    A repeated (qid, docid) pair keeps the last grade.
    """
    qrels: Qrels = {}
    ncols = None
    for n, line in _lines(path, "qrels"):
        parts = line.split()
        if not parts:
            continue
        if ncols is None:
            ncols = len(parts)
            if ncols not in (3, 4):
                raise InvalidInputError(
                    f"{path}:{n}: expected BEIR 'query-id corpus-id score' or TREC 'qid iter docid rel' "
                    f"lines, got {ncols} fields")
            if _is_header(parts):
                continue
            if _int(parts[-1]) is None:
                raise InvalidInputError(
                    f"{path}:{n}: relevance {parts[-1]!r} is not an integer, and the line is not a header "
                    f"(a header names the columns, e.g. 'query-id corpus-id score' or 'qid iter docid rel')")
        if len(parts) != ncols:
            raise InvalidInputError(f"{path}:{n}: expected {ncols} fields like the first line, got {len(parts)}")
        rel = _int(parts[-1])
        if rel is None:
            raise InvalidInputError(f"{path}:{n}: relevance {parts[-1]!r} is not an integer")
        qid, did = parts[0], parts[1] if ncols == 3 else parts[2]
        qrels.setdefault(qid, {})[did] = rel
    if not qrels:
        raise InvalidInputError(f"{path}: the qrels hold no judgements")
    return qrels


def read_run(path: str) -> Run:
    """Read a TREC run ``qid Q0 docid rank score tag``: {qid: {docid: score}}."""
    run: Run = {}
    for n, line in _lines(path, "run"):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise InvalidInputError(f"{path}:{n}: expected 'qid Q0 docid rank score tag', got {len(parts)} fields")
        qid, _, did, rank, score, _tag = parts
        try:
            int(rank)
            s = float(score)
        except ValueError:
            raise InvalidInputError(f"{path}:{n}: rank {rank!r} or score {score!r} is not a number") from None
        if not math.isfinite(s):
            raise InvalidInputError(f"{path}:{n}: score {score!r} is not finite")
        docs = run.setdefault(qid, {})
        if did in docs:
            raise InvalidInputError(f"{path}:{n}: document {did!r} appears twice for query {qid!r}")
        docs[did] = s
    if not run:
        raise InvalidInputError(f"{path}: the run is empty")
    return run


def _run_word(value) -> Optional[str]:
    """``value`` as one column of a TREC run line (a str, or an int), or None when it cannot be one:
    empty, or containing whitespace (any character for which ``str.isspace()`` holds)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value or any(c.isspace() for c in value):
        return None
    return value


def check_run(query_ids: Sequence[str], doc_ids: Sequence[Sequence[Optional[str]]], scores,
              tag: str = "plaid") -> None:
    """Raise :class:`InvalidInputError` unless :func:`write_run` can write these results faithfully.

    A TREC run is whitespace-separated columns, so a query id, document id or tag that is empty or
    contains whitespace (a space, tab, newline, no-break space: any character for which
    ``str.isspace()`` holds) would shift or split the columns: it is refused, naming the id, its
    query and its rank. So are a query id given twice, a score that is not finite, and ``doc_ids``
    or ``scores`` with another number of rows than ``query_ids`` (or of entries than each other).
    Ids are strings (ints are written as their decimal form).
    """
    if _run_word(tag) is None:
        raise InvalidInputError(f"run tag {tag!r} must be a non-empty word without spaces")
    if len(doc_ids) != len(query_ids) or len(scores) != len(query_ids):
        raise InvalidInputError(f"{len(query_ids)} query ids for {len(doc_ids)} rows of document ids and "
                                f"{len(scores)} rows of scores")
    seen = {}
    for i, (qid, docs, row) in enumerate(zip(query_ids, doc_ids, scores)):
        q = _run_word(qid)
        if q is None:
            raise InvalidInputError(f"query id {qid!r} (query {i}) is empty or contains whitespace: "
                                    "it cannot be written to a TREC run")
        if q in seen:
            raise InvalidInputError(f"query id {q!r} is given twice (queries {seen[q]} and {i}): "
                                    "a TREC run could not tell them apart")
        seen[q] = i
        if len(docs) != len(row):
            raise InvalidInputError(f"query {q!r}: {len(docs)} document ids for {len(row)} scores")
        rank = 0
        for did, s in zip(docs, row):
            if did is None:
                continue
            rank += 1
            if _run_word(did) is None:
                raise InvalidInputError(f"document id {did!r} (query {q!r}, rank {rank}) is empty or contains "
                                        "whitespace: it cannot be written to a TREC run")
            if not math.isfinite(float(s)):
                raise InvalidInputError(f"document {did!r} (query {q!r}, rank {rank}) has the score {float(s)}, "
                                        "which is not finite")


def _write_lines(f, query_ids, doc_ids, scores, tag: str) -> int:
    lines = 0
    for qid, docs, row in zip(query_ids, doc_ids, scores):
        rank = 0
        for did, s in zip(docs, row):
            if did is None:
                continue
            rank += 1
            f.write(f"{qid} Q0 {did} {rank} {float(s):.6f} {tag}\n")
            lines += 1
    return lines


def write_run(f, query_ids: Sequence[str], doc_ids: Sequence[Sequence[Optional[str]]], scores,
              tag: str = "plaid") -> int:
    """Write TREC run lines ``qid Q0 docid rank score tag`` to the text stream ``f``.

    ``doc_ids[i]`` are query ``i``'s hits best first (``None`` entries, i.e. missing hits, are
    skipped); ``scores[i][j]`` the score of ``doc_ids[i][j]``. Returns the number of lines written.
    Everything is checked by :func:`check_run` before the first line is written: a query or
    document id that is empty or contains whitespace raises :class:`InvalidInputError` naming the
    id and its query, and nothing is written.
    """
    check_run(query_ids, doc_ids, scores, tag)
    return _write_lines(f, query_ids, doc_ids, scores, tag)


def save_run(path: str, query_ids: Sequence[str], doc_ids: Sequence[Sequence[Optional[str]]], scores,
             tag: str = "plaid") -> int:
    """:func:`write_run` to the file ``path``, atomically (a temporary file renamed over it).

    The results are checked (:func:`check_run`) before any file is created: an id that cannot be
    written raises :class:`InvalidInputError` ``"cannot write the run <path>: ..."`` naming it and
    its query, and ``path`` is left as it was.
    """
    try:
        check_run(query_ids, doc_ids, scores, tag)
    except InvalidInputError as e:
        raise InvalidInputError(f"cannot write the run {path}: {e}") from None
    fd, tmp = tempfile.mkstemp(prefix=".plaid-run-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            n = _write_lines(f, query_ids, doc_ids, scores, tag)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n


_METRIC_HELP = "ir-measures names, e.g. nDCG@10 RR@10 R@100 P@5 AP"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _metric_problem(measure) -> Optional[str]:
    """What is wrong with a parsed ir-measures measure (None when it can be computed)."""
    params, supported = dict(measure.params), measure.SUPPORTED_PARAMS
    extra = sorted(set(params) - set(supported))
    if extra:
        return f"{measure.NAME} takes no parameter {', '.join(extra)}"
    for name, what in (("cutoff", "the cutoff (@k)"), ("rel", "rel (the minimum relevant grade)")):
        if name in params:
            v = params[name]
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_METRIC_PARAM:
                return f"{what} must be a positive integer (1 to {MAX_METRIC_PARAM}), got {v!r}"
    for name, info in supported.items():
        if name not in params and info.required:
            example = f"e.g. {measure.NAME}@10" if name == "cutoff" else f"{measure.NAME}({name}=...)"
            return f"{measure.NAME} needs a {name} ({example})"
        if name in params and not info.validate(params[name]):
            return f"invalid value {name}={params[name]!r}"
    try:
        measure.validate_params()
    except Exception as e:  # noqa: BLE001 - ir-measures asserts
        return f"invalid parameters ({_first_line(e)})"
    return None


def parse_metrics(metrics: Sequence[str]):
    """Check metric names and parse them with ir-measures: ``(ir_measures module, [measures])``.

    Each name must be one ir-measures parses (``nDCG@10``, ``RR@10``, ``R@100``, ``P(rel=2)@5``,
    ``AP``...) and one of its installed providers computes; a cutoff (``@k``) and a ``rel`` level
    must be integers from 1 to :data:`MAX_METRIC_PARAM`. Anything else (an unknown or empty name,
    ``@0``, ``@-1``, ``@x``, a missing cutoff) raises :class:`InvalidInputError` naming the metric,
    before ir-measures computes anything: pytrec_eval aborts the whole process on a cutoff of 0.
    """
    if isinstance(metrics, str):
        metrics = [metrics]
    metrics = list(metrics)
    if not metrics:
        raise InvalidInputError(f"no metrics given ({_METRIC_HELP})")
    try:
        import ir_measures
    except ImportError:
        raise InvalidInputError(
            "evaluation needs ir-measures: pip install 'plaid-engine[eval]' (or pip install ir-measures)"
        ) from None
    parsed = []
    for name in metrics:
        if not isinstance(name, str):
            raise InvalidInputError(f"metric {name!r} is not a name ({_METRIC_HELP})")
        if not name.strip():
            raise InvalidInputError(f"empty metric name {name!r} ({_METRIC_HELP})")
        try:
            measure = ir_measures.parse_measure(name)
        except Exception as e:  # noqa: BLE001 - ir-measures raises ValueError, NameError, SyntaxError, ...
            reason = _first_line(e)
            head, at, tail = name.rpartition("@")
            if at and head and not tail.strip().isdigit():
                reason = f"the cutoff after '@' must be a positive integer, got {tail!r}"
            raise InvalidInputError(f"unknown metric {name!r} ({_METRIC_HELP}): {reason}") from None
        problem = _metric_problem(measure)
        if problem is None and not ir_measures.DefaultPipeline.supports(measure):
            problem = "no installed ir-measures provider computes it"
        if problem is not None:
            raise InvalidInputError(f"invalid metric {name!r}: {problem}")
        parsed.append(measure)
    return ir_measures, parsed


@contextlib.contextmanager
def _stderr_captured(out: List[str]):
    """Collect what is written to file descriptor 2 (by C code or a child process, such as
    ir-measures' gdeval perl script) into ``out`` instead of the terminal."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no fd 2: nothing to capture
        yield
        return
    with tempfile.TemporaryFile() as buf:
        os.dup2(buf.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            buf.seek(0)
            out.append(buf.read().decode("utf-8", "replace"))


def evaluate(run: Run, qrels: Qrels, metrics: Sequence[str] = DEFAULT_METRICS,
             doc_ids: Optional[Sequence[str]] = None) -> dict:
    """Mean of each metric over the judged queries of the run, computed by ir-measures.

    Queries of the run without judgements are left out (trec_eval's convention); judged queries
    absent from the run are left out too, with a warning giving their count. When ``doc_ids``
    (the index's ids) is given, a run naming a document outside it raises, and qrels naming
    documents outside it draw a warning with their count.

    ``metrics`` are checked by :func:`parse_metrics` first (an invalid one raises
    :class:`InvalidInputError` naming it); a provider that fails while computing them (ir-measures'
    gdeval, for ``ERR@k``, runs a perl script that accepts numeric query ids only) raises one too,
    with what it wrote to stderr.

    Returns ``{"metrics": {name: value}, "queries": n_evaluated, "run_queries": ..., ...}``.
    """
    ir_measures, measures = parse_metrics(metrics)
    if doc_ids is not None:
        known = set(doc_ids)
        unknown_run = {d for docs in run.values() for d in docs if d not in known}
        if unknown_run:
            ex = ", ".join(sorted(unknown_run)[:3])
            raise InvalidInputError(f"the run names {len(unknown_run)} document id(s) that are not in the index "
                                    f"(e.g. {ex}); was it made with another index?")
        unknown_qrels = {d for docs in qrels.values() for d in docs if d not in known}
        if unknown_qrels:
            warnings.warn(f"qrels name {len(unknown_qrels)} document id(s) that are not in the index "
                          f"(e.g. {', '.join(sorted(unknown_qrels)[:3])}); they can never be retrieved")
    missing = [q for q in qrels if q not in run]
    if missing:
        warnings.warn(f"qrels name {len(missing)} quer{'y' if len(missing) == 1 else 'ies'} that the run does "
                      f"not have (e.g. {', '.join(missing[:3])}); left out of the averages")
    unjudged = [q for q in run if q not in qrels]
    used = {q: j for q, j in qrels.items() if q in run}
    if not used:
        raise InvalidInputError("no query of the run has judgements in the qrels: nothing to evaluate "
                                "(do the query ids of the run and the qrels match?)")
    noise: List[str] = []
    try:
        with _stderr_captured(noise):
            agg = ir_measures.calc_aggregate(measures, used, run)
    except Exception as e:  # noqa: BLE001 - a provider's failure (gdeval's perl script, a division by zero...)
        said = [line.strip() for line in "".join(noise).splitlines() if line.strip()]
        reason = f"{type(e).__name__}: {_first_line(e)}"
        if isinstance(e, subprocess.CalledProcessError):
            cmd = e.cmd[0] if isinstance(e.cmd, (list, tuple)) and e.cmd else e.cmd
            reason = f"{cmd} exited with status {e.returncode}"
        raise InvalidInputError(f"ir-measures could not compute {' '.join(map(str, measures))}: {reason}"
                                + (f" (it said: {said[-1]})" if said else "")) from None
    if "".join(noise).strip():
        sys.stderr.write("".join(noise))
    return {
        "metrics": {str(m): float(agg[m]) for m in measures},
        "queries": len(used),
        "run_queries": len(run),
        "unjudged_queries": len(unjudged),
        "judged_queries_missing_from_run": len(missing),
    }


def format_table(result: dict) -> str:
    """A two-column text table of :func:`evaluate`'s result."""
    rows = list(result["metrics"].items())
    width = max([len("metric")] + [len(k) for k, _ in rows])
    out = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
    out += [f"{k:<{width}}  {v:.4f}" for k, v in rows]
    note = f"{result['queries']} judged queries"
    if result.get("unjudged_queries"):
        note += f" ({result['unjudged_queries']} unjudged queries of the run left out)"
    out.append(note)
    return "\n".join(out)
