"""Offline evaluation: BEIR / TREC readers and writers, and metrics through ir-measures.

Formats
-------
* BEIR corpus ``corpus.jsonl``: one JSON object per line with ``_id``, ``text`` and an optional
  ``title``; the document text is ``title + " " + text`` when the title is not empty.
* BEIR queries ``queries.jsonl``: ``_id`` and ``text`` per line (a ``qid<TAB>text`` ``.tsv`` file
  is read too).
* qrels: BEIR ``query-id corpus-id score`` (tab separated, with or without a header line) or TREC
  ``qid iter docid rel``. Only a first line whose relevance field is not an integer is taken for a
  header: a file without one (msmarco-5k's) keeps its first judgement.
* run: TREC ``qid Q0 docid rank score tag``, one line per retrieved document.

Metrics are computed by ir-measures (``pip install 'plaid-engine[eval]'``), never by hand; names
are ir-measures names (``nDCG@10``, ``RR@10``, ``R@100``, ``P@5``, ``AP``...). Queries without
judgements are left out of the averages, as trec_eval does.

Every problem with an input file raises :class:`plaid.InvalidInputError` naming the file and,
where it applies, the line number.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from .errors import InvalidInputError

__all__ = [
    "read_jsonl",
    "load_corpus",
    "load_queries",
    "load_qrels",
    "read_run",
    "write_run",
    "save_run",
    "evaluate",
    "format_table",
    "DEFAULT_METRICS",
]

DEFAULT_METRICS = ("nDCG@10", "RR@10", "R@100")

Qrels = Dict[str, Dict[str, int]]
Run = Dict[str, Dict[str, float]]


def _open_text(path: str, what: str):
    if not os.path.exists(path):
        raise InvalidInputError(f"{what} file not found: {path}")
    if os.path.isdir(path):
        raise InvalidInputError(f"{what} path is a directory, expected a file: {path}")
    return open(path, encoding="utf-8")


def read_jsonl(path: str, fields: Sequence[str], what: str = "JSONL") -> Iterator[Tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Raises :class:`InvalidInputError` ``"<path>:<line>: ..."`` for a line that does not parse, is not
    a JSON object, or lacks one of ``fields``.
    """
    with _open_text(path, what) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"{path}:{n}: not valid JSON ({e.msg})") from None
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
        with _open_text(path, "queries") as f:
            for n, line in enumerate(f, 1):
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


def load_qrels(path: str) -> Qrels:
    """Read BEIR (3 columns, optional header) or TREC (4 columns) qrels: {qid: {docid: relevance}}.

    The first line is a header only when its relevance field is not a number; any later line that
    does not parse raises with its line number. A repeated (qid, docid) pair keeps the last grade.
    """
    qrels: Qrels = {}
    ncols = None
    with _open_text(path, "qrels") as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if ncols is None:
                ncols = len(parts)
                if ncols not in (3, 4):
                    raise InvalidInputError(
                        f"{path}:{n}: expected BEIR 'query-id corpus-id score' or TREC 'qid iter docid rel' "
                        f"lines, got {ncols} fields")
                if _int(parts[-1]) is None:  # header line (BEIR: query-id corpus-id score)
                    continue
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
    with _open_text(path, "run") as f:
        for n, line in enumerate(f, 1):
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


def write_run(f, query_ids: Sequence[str], doc_ids: Sequence[Sequence[Optional[str]]], scores,
              tag: str = "plaid") -> int:
    """Write TREC run lines ``qid Q0 docid rank score tag`` to the text stream ``f``.

    ``doc_ids[i]`` are query ``i``'s hits best first (``None`` entries, i.e. missing hits, are
    skipped); ``scores[i][j]`` the score of ``doc_ids[i][j]``. Returns the number of lines written.
    """
    if any(c.isspace() for c in tag) or not tag:
        raise InvalidInputError(f"run tag {tag!r} must be a non-empty word without spaces")
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


def save_run(path: str, query_ids: Sequence[str], doc_ids: Sequence[Sequence[Optional[str]]], scores,
             tag: str = "plaid") -> int:
    """:func:`write_run` to the file ``path``, atomically (a temporary file renamed over it)."""
    fd, tmp = tempfile.mkstemp(prefix=".plaid-run-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            n = write_run(f, query_ids, doc_ids, scores, tag=tag)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return n


def _parse_metrics(metrics: Sequence[str]):
    try:
        import ir_measures
    except ImportError:
        raise InvalidInputError(
            "evaluation needs ir-measures: pip install 'plaid-engine[eval]' (or pip install ir-measures)"
        ) from None
    parsed = []
    for name in metrics:
        try:
            parsed.append(ir_measures.parse_measure(name))
        except (ValueError, NameError, KeyError, TypeError) as e:
            raise InvalidInputError(
                f"unknown metric {name!r} (ir-measures names, e.g. nDCG@10 RR@10 R@100 P@5 AP): {e}"
            ) from None
    return ir_measures, parsed


def evaluate(run: Run, qrels: Qrels, metrics: Sequence[str] = DEFAULT_METRICS,
             doc_ids: Optional[Sequence[str]] = None) -> dict:
    """Mean of each metric over the judged queries of the run, computed by ir-measures.

    Queries of the run without judgements are left out (trec_eval's convention); judged queries
    absent from the run are left out too, with a warning giving their count. When ``doc_ids``
    (the index's ids) is given, a run naming a document outside it raises, and qrels naming
    documents outside it draw a warning with their count.

    Returns ``{"metrics": {name: value}, "queries": n_evaluated, "run_queries": ..., ...}``.
    """
    ir_measures, measures = _parse_metrics(metrics)
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
    agg = ir_measures.calc_aggregate(measures, used, run)
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
