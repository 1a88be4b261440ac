"""The ``plaid`` command (also ``python -m plaid``): index, search, evaluate, info, verify, upgrade.

Argument parsing, and calls into ``plaid.pipeline``, ``plaid.evaluation`` and ``plaid.Index``;
nothing else. Progress bars and notes go to stderr; data (a run without ``--output``, ``--json``)
to stdout.

Exit codes: 0 success; 2 for every failure, reported as exactly one line on stderr (the last one:
progress notes, and warnings, may come before it; with ``--quiet`` only warnings) and never a
traceback: ``plaid <command>: error: <what>`` for a usage error or a bad input (a
:class:`plaid.PlaidError`, an ``OSError`` such as a missing or unreadable file or a full disk, a
``ValueError``, a ``MemoryError``), ``plaid <command>: internal error: <Type>: <message> (please
report it)`` for any other exception (a bug: still one line, still exit 2); 130 interrupted
(Ctrl-C, nothing printed); 141 when stdout is a closed pipe (``plaid search ... | head``,
nothing printed).

Messages go through the ``plaid`` logger (library modules log under ``plaid.*``): :func:`main`
gives it a stderr handler printing ``plaid: <message>`` at level INFO, WARNING with ``--quiet``,
for the duration of the call (it does not touch the root logger, and repeated calls do not add
handlers). Python warnings raised by plaid show as one ``plaid: warning: ...`` line each.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from typing import List, Optional

from . import __version__
from .errors import PlaidError

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)

EXAMPLES = """\
examples:
  plaid index idx/ --embeddings msmarco-5k/
  plaid index idx/ --corpus corpus.jsonl --checkpoint colbertv2.0/ --save-embeddings emb/
  plaid search idx/ --queries queries.jsonl --checkpoint colbertv2.0/ --k 100 --output run.trec
  plaid evaluate --run run.trec --qrels qrels/test.tsv --metrics nDCG@10 RR@10 R@100
  plaid info idx/
  plaid verify idx/
  plaid upgrade old-idx/
  plaid index sharded/ --embeddings msmarco-5k/ --shards 4 [--ray-address auto]
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error in one line (and exit code 2) instead of the usage block."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


MAX_SEED = 2**31 - 1  # faiss takes a C int, numpy a non-negative integer


def _seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = -1
    if not 0 <= v <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to {MAX_SEED}, got {s!r}")
    return v


def _finite_float(s: str) -> float:
    import math

    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _pool_factor(s: str) -> float:
    import math

    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and 1 <= v <= 2**53):
        raise argparse.ArgumentTypeError(f"expected a number from 1 (no pooling) to 2**53, got {s!r}")
    return int(v) if v.is_integer() else v


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or notes on stderr (warnings and errors still show)")


class _Help(argparse.HelpFormatter):
    """Appends "(default: X)" to an option's help where the default is a value worth showing."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        value = " ".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
        return f"{text} (default: {value})"


def build_parser() -> argparse.ArgumentParser:
    fmt = _Help
    parser = _Parser(prog="plaid", description="PLAID late-interaction (ColBERT) index and search engine.",
                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"plaid {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # -- index ----------------------------------------------------------------------------------
    p = sub.add_parser("index", formatter_class=fmt, help="build an index from embeddings or from a text corpus",
                       description="Build a compressed PLAID index from an embeddings bundle (read memory-mapped) "
                                   "or from a BEIR corpus.jsonl encoded with a local ColBERT checkpoint.")
    p.add_argument("index_dir", metavar="INDEX_DIR", help="directory to write the index to (must be empty or absent unless --overwrite)")
    src = p.add_argument_group("input (one of)")
    src.add_argument("--embeddings", metavar="BUNDLE_DIR", default=None,
                     help="embeddings bundle: doc_embeddings.f16.npy, doclens.npy and doc_ids.txt (as in shared/data/msmarco-5k)")
    src.add_argument("--corpus", metavar="CORPUS_JSONL", default=None,
                     help="BEIR corpus.jsonl (_id, optional title, text); needs --checkpoint")
    enc = p.add_argument_group("text encoding (with --corpus)")
    enc.add_argument("--checkpoint", metavar="MODEL_DIR", default=None,
                     help="local ColBERT checkpoint folder (Stanford ColBERT or PyLate layout); nothing is downloaded")
    enc.add_argument("--save-embeddings", metavar="BUNDLE_DIR", default=None,
                     help="also write the document embeddings there as a bundle (reusable with --embeddings)")
    enc.add_argument("--batch-size", type=_positive_int, default=32, help="texts per encoder forward pass")
    enc.add_argument("--doc-maxlen", type=_positive_int, default=None,
                     help="document length in tokens (default: the checkpoint's)")
    enc.add_argument("--device", default="cpu", help="torch device of the encoder (cpu, cuda)")
    ix = p.add_argument_group("index parameters (see plaid.Indexer)")
    ix.add_argument("--preset", choices=["compact", "balanced", "accurate"], default="balanced",
                    help="measured codec setting (the options below override it): compact PQ 16 bytes, "
                         "balanced PQ 34 bytes and search depth 3, accurate PQ 64 bytes and search depth 4, all with a "
                         "learned rotation")
    ix.add_argument("--codec", choices=["pq", "scalar"], default=None,
                    help="residual codec: product quantisation or ColBERTv2 scalar buckets (default: the preset's, pq)")
    ix.add_argument("--pq-m", type=_positive_int, default=None,
                    help="PQ sub-quantisers = residual bytes per token, at most the dimension (default: the preset's)")
    ix.add_argument("--pq-rotation", action=argparse.BooleanOptionalAction, default=None,
                    help="rotate residuals onto their principal axes before PQ (default: the preset's, on)")
    ix.add_argument("--nbits", type=int, choices=[1, 2, 4], default=None,
                    help="bits per dimension of the scalar codec (default 2)")
    ix.add_argument("--num-centroids", type=_positive_int, default=None,
                    help="k-means centroids (default: PLAID's 2**floor(log2(16*sqrt(tokens))))")
    ix.add_argument("--kmeans-niter", type=_positive_int, default=4, help="k-means iterations")
    ix.add_argument("--seed", type=_seed, default=0,
                    help=f"seed of sampling, k-means and codec training (0 to {MAX_SEED})")
    ix.add_argument("--pool-factor", type=_pool_factor, default=1, metavar="F",
                    help="token pooling: a document of n tokens is stored as ceil(n/F) means of Ward "
                         "clusters of its tokens (1: every token; 2: about half the vectors)")
    ix.add_argument("--search-depth", type=_positive_int, default=None, metavar="D",
                    help="recorded in the index: searches keep D times the default ndocs through stages 2-4 "
                         "(default: the preset's: compact 1, balanced 3, accurate 4; at most 64)")
    sh = p.add_argument_group("sharded index on Ray (needs the [ray] extra)")
    sh.add_argument("--shards", type=_positive_int, default=None, metavar="N",
                    help="build a sharded index of N shards: train once here, encode each shard in a Ray task")
    sh.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="Ray cluster to run on: 'auto' or host:port (default: a local Ray started for the command)")
    sh.add_argument("--max-shard-documents", type=_positive_int, default=None, metavar="N",
                    help="documents added later open a new shard rather than grow one past N live documents")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index (and --save-embeddings folder)")
    _add_common(p)

    # -- search ---------------------------------------------------------------------------------
    p = sub.add_parser("search", formatter_class=fmt, help="search queries and write a TREC run",
                       description="Search every query of a file and write a TREC run "
                                   "(qid Q0 docid rank score tag) with the documents' external ids.")
    p.add_argument("index_dir", metavar="INDEX_DIR", help="the index to search")
    src = p.add_argument_group("queries (one of)")
    src.add_argument("--queries", metavar="QUERIES", default=None,
                     help="BEIR queries.jsonl (_id, text) or a qid<TAB>text .tsv; needs --checkpoint")
    src.add_argument("--query-embeddings", metavar="BUNDLE_DIR", default=None,
                     help="bundle with query_embeddings.f16.npy, query_lens.npy and query_ids.txt")
    enc = p.add_argument_group("text encoding (with --queries)")
    enc.add_argument("--checkpoint", metavar="MODEL_DIR", default=None,
                     help="local ColBERT checkpoint folder, the one the index was built with")
    enc.add_argument("--batch-size", type=_positive_int, default=32, help="queries per encoder forward pass")
    enc.add_argument("--query-maxlen", type=_positive_int, default=None,
                     help="query length in tokens, [MASK]-padded (default: the checkpoint's)")
    s = p.add_argument_group("search parameters (defaults by k: see plaid.default_search_params)")
    s.add_argument("--k", type=_positive_int, default=10,
                   help="results per query (more than the index's documents: as many as it has)")
    s.add_argument("--ncells", type=_positive_int, default=None, help="centroids probed per query token (default: by --k)")
    s.add_argument("--centroid-score-threshold", type=_finite_float, default=None,
                   help="stage-2 pruning threshold (default: by --k)")
    s.add_argument("--ndocs", type=_positive_int, default=None, help="candidates kept after stage 2 (default: by --k, times the index's search depth)")
    p.add_argument("--device", default="cpu", help="torch device for search and encoding (cpu, cuda)")
    p.add_argument("--output", "-o", metavar="RUN", default=None,
                   help="TREC run file to write (default: stdout); query and document ids must be words "
                        "without whitespace (an id that is not is refused, naming it)")
    p.add_argument("--tag", default="plaid", help="run tag, the last column of the run")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    sh = p.add_argument_group("sharded index on Ray")
    sh.add_argument("--ray-address", default=None, metavar="ADDR",
                    help="Ray cluster to run the shard actors on: 'auto' or host:port (default: a local Ray)")
    sh.add_argument("--allow-partial", action="store_true",
                    help="a shard that does not answer in time is left out (a warning names it) instead of an error")
    _add_common(p)

    # -- evaluate -------------------------------------------------------------------------------
    p = sub.add_parser("evaluate", formatter_class=fmt, help="score a TREC run against qrels (ir-measures)",
                       description="Score a TREC run against BEIR or TREC qrels with ir-measures. Queries "
                                   "without judgements are left out of the averages, as trec_eval does.")
    p.add_argument("--run", required=True, metavar="RUN", help="TREC run file (qid Q0 docid rank score tag)")
    p.add_argument("--qrels", required=True, metavar="QRELS",
                   help="BEIR qrels (query-id corpus-id score; header line optional) or TREC qrels (qid iter docid rel)")
    p.add_argument("--metrics", nargs="+", default=["nDCG@10", "RR@10", "R@100"], metavar="METRIC",
                   help="ir-measures names (nDCG@10, RR@10, R@100, P@10, AP, ...)")
    p.add_argument("--index", metavar="INDEX_DIR", default=None,
                   help="check the run's and the qrels' document ids against this index")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of a table")
    _add_common(p)

    # -- info -----------------------------------------------------------------------------------
    p = sub.add_parser("info", formatter_class=fmt, help="counts, sizes and parameters of an index",
                       description="Counts, sizes, bytes per token, codec, build parameters and format version of an index.")
    p.add_argument("index_dir", metavar="INDEX_DIR", help="the index")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--verify", action="store_true", help="also check every file's size and CRC-32 (reads the whole index)")
    _add_common(p)

    # -- verify ---------------------------------------------------------------------------------
    p = sub.add_parser("verify", formatter_class=fmt, help="check every index file against the manifest",
                       description="Check the size and CRC-32 of every file the index's manifest lists, and that "
                                   "the index opens. Prints 'ok' and exits 0 when intact; names every missing, "
                                   "truncated or altered file and exits 2 otherwise.")
    p.add_argument("index_dir", metavar="INDEX_DIR", help="the index")
    _add_common(p)

    # -- upgrade --------------------------------------------------------------------------------
    p = sub.add_parser("upgrade", formatter_class=fmt, help="convert an index of an older format version in place",
                       description="Convert an index written by an older plaid (format version 2) to the current "
                                   "format, in place and atomically: searches keep answering from the old "
                                   "generation until the switch; a killed upgrade leaves the old index. Only the "
                                   "token norms are rewritten (float16 -> one byte).")
    p.add_argument("index_dir", metavar="INDEX_DIR", help="the index")
    _add_common(p)
    return parser


# -- commands ------------------------------------------------------------------------------------
def _cmd_index(args) -> int:
    from .pipeline import build_index

    t = time.perf_counter()
    options = {"preset": args.preset, "codec": args.codec, "pq_m": args.pq_m, "pq_rotation": args.pq_rotation,
               "nbits": args.nbits, "num_centroids": args.num_centroids, "kmeans_niter": args.kmeans_niter,
               "seed": args.seed, "pool_factor": args.pool_factor, "search_depth": args.search_depth}
    index, timings = build_index(
        args.index_dir, embeddings=args.embeddings, corpus=args.corpus, checkpoint=args.checkpoint,
        save_embeddings=args.save_embeddings, overwrite=args.overwrite, device=args.device,
        batch_size=args.batch_size, doc_maxlen=args.doc_maxlen, indexer_options=options,
        show_progress=not args.quiet, shards=args.shards, ray_address=args.ray_address,
        max_shard_documents=args.max_shard_documents)
    info = index.info()
    shards = f"{info['num_shards']} shards, " if info.get("sharded") else ""
    logger.info(f"index {args.index_dir}: {shards}{info['num_documents']} documents, {info['num_tokens']} tokens, "
                f"{info['bytes'] / 2**20:.1f} MiB ({info['bytes_per_token']:.1f} bytes/token); "
                f"{' '.join(f'{k} {v:.1f}s' for k, v in timings.items())}, total {time.perf_counter() - t:.1f}s")
    return 0


def _cmd_search(args) -> int:
    from .evaluation import save_run, write_run
    from .pipeline import check_output_file, search

    t = time.perf_counter()
    if args.output is not None and args.output != "-":
        check_output_file(args.output, args.overwrite, "run file")
    qids, doc_ids, scores, timings = search(
        args.index_dir, queries=args.queries, checkpoint=args.checkpoint, query_embeddings=args.query_embeddings,
        k=args.k, ncells=args.ncells, centroid_score_threshold=args.centroid_score_threshold, ndocs=args.ndocs,
        device=args.device, batch_size=args.batch_size, query_maxlen=args.query_maxlen,
        show_progress=not args.quiet, ray_address=args.ray_address, allow_partial=args.allow_partial)
    if args.output is None or args.output == "-":
        write_run(sys.stdout, qids, doc_ids, scores, tag=args.tag)
        sys.stdout.flush()
    else:
        save_run(args.output, qids, doc_ids, scores, tag=args.tag)
        logger.info(f"run written to {args.output}")
    logger.info(f"search: {' '.join(f'{k} {v:.2f}s' for k, v in timings.items())}, "
                f"total {time.perf_counter() - t:.1f}s")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluation import evaluate, format_table, load_qrels, parse_metrics, read_run
    from .indexing.index import Index

    parse_metrics(args.metrics)  # a bad metric is reported before the files are read
    qrels = load_qrels(args.qrels)
    run = read_run(args.run)
    doc_ids = None
    if args.index is not None:
        from .distributed.sharded import ShardedIndex, is_sharded

        doc_ids = (ShardedIndex if is_sharded(args.index) else Index)(args.index).doc_ids
        if doc_ids is None:
            warnings.warn(f"{args.index} stores no document ids: the run's ids are not checked")
    result = evaluate(run, qrels, args.metrics, doc_ids=doc_ids)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(format_table(result))
    return 0


def _pooling_text(pooling) -> str:
    if not pooling:
        return "none (every token stored)"
    return f"{pooling['method']}, factor {pooling['factor']} (tokens and bytes per token count pooled vectors)"


def _cmd_info_sharded(args) -> int:
    from .distributed.sharded import ShardedIndex

    index = ShardedIndex(args.index_dir)
    problems = index.verify() if args.verify else []
    if problems:
        _error(args, f"{args.index_dir}: sharded index verification failed: {'; '.join(problems)}")
        return 2
    info = index.info()
    if args.verify:
        info["problems"] = []
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    rows = [
        ("path", info["path"]),
        ("format", f"sharded plaid index, version {info['format_version']}"),
        ("created by", info["created_by"]),
        ("shards", info["num_shards"]),
        ("documents", f"{info['num_live_documents']} live ({info['num_documents']} ids, {info['num_deleted']} deleted)"),
        ("tokens", info["num_tokens"]),
        ("dim", info["dim"]),
        ("codec", " ".join(f"{k}={v}" for k, v in info["codec"].items())),
        ("pooling", _pooling_text(info["pooling"])),
        ("search depth", f"{info['search_depth']} (default ndocs x{info['search_depth']})"),
        ("codec fingerprint", info["codec_fingerprint"][:16]),
        ("normalized", info["normalized"]),
        ("size", f"{info['bytes']} bytes ({info['bytes'] / 2**20:.2f} MiB)"),
        ("bytes per token", info["bytes_per_token"]),
        ("external ids", "yes" if info["has_doc_ids"] else "no"),
        ("max shard documents", info["max_shard_documents"] or "no limit"),
        ("generation", info["generation"]),
    ]
    for s in info["shards"]:
        rows.append((s["name"], f"{s['num_live_documents']} live of {s['num_documents']} documents, {s['num_tokens']} "
                                f"tokens, {s['num_centroids']} centroids, generation {s['generation']}"))
    if args.verify:
        rows.append(("verify", "ok"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


def _cmd_info(args) -> int:
    from .distributed.sharded import is_sharded
    from .indexing.index import Index

    if is_sharded(args.index_dir):
        return _cmd_info_sharded(args)
    index = Index(args.index_dir)
    if args.verify:  # first: a damaged file is reported as such, not as a failure to open it
        problems = index.verify()
        if problems:
            _error(args, f"{args.index_dir}: index verification failed: {'; '.join(problems)}")
            return 2
    info = index.info()
    if args.verify:
        info["problems"] = []
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        codec = info["codec"]
        rows = [
            ("path", info["path"]),
            ("format version", info["format_version"]),
            ("created by", info["created_by"]),
            ("documents", f"{info['num_live_documents']} live ({info['num_documents']} ids, "
                          f"{info['num_deleted']} deleted, {info['num_empty_documents']} empty)"),
            ("segments", info["num_segments"]),
            ("tokens", info["num_tokens"]),
            ("centroids", info["num_centroids"]),
            ("dim", info["dim"]),
            ("codec", " ".join(f"{k}={v}" for k, v in codec.items())),
            ("pooling", _pooling_text(info["pooling"])),
            ("search depth", f"{info['search_depth']} (default ndocs x{info['search_depth']})"),
            ("normalized", info["normalized"]),
            ("size", f"{info['bytes']} bytes ({info['bytes'] / 2**20:.2f} MiB)"),
            ("bytes per token", f"{info['bytes_per_token']} (payload {info['payload_bytes_per_token']}: "
                                f"centroid id + residual code{' + norm' if info['normalized'] else ''})"),
            ("external ids", "yes" if info["has_doc_ids"] else "no"),
            ("build", " ".join(f"{k}={v}" for k, v in info["build"].items())),
            ("generation", info["generation"]),
        ]
        if args.verify:
            rows.append(("verify", "ok" if not info["problems"] else "; ".join(info["problems"])))
        width = max(len(k) for k, _ in rows)
        print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    if args.verify and info["problems"]:
        _error(args, f"{args.index_dir}: index verification failed: {'; '.join(info['problems'])}")
        return 2
    return 0


def _cmd_verify(args) -> int:
    from .distributed.sharded import ShardedIndex, is_sharded
    from .indexing.index import Index
    from .search.searcher import Searcher

    if is_sharded(args.index_dir):
        sharded = ShardedIndex(args.index_dir)
        problems = sharded.verify()
        if not problems:
            print(f"ok: {args.index_dir}: {sharded.num_shards} shards intact, one codec, ids unique "
                  f"(generation {sharded.generation})")
            return 0
        for p in problems:
            print(f"{args.index_dir}: {p}")
        _error(args, f"{args.index_dir}: sharded index verification failed ({len(problems)} problem(s))")
        return 2
    index = Index(args.index_dir)
    problems = index.verify()
    if not problems:
        Searcher(args.index_dir)  # also checks shapes and cross-array consistency
        print(f"ok: {args.index_dir}: {len(index.manifest['arrays'])} files intact (generation {index.generation})")
        return 0
    for p in problems:
        print(f"{args.index_dir}: {p}")
    _error(args, f"{args.index_dir}: index verification failed ({len(problems)} problem(s))")
    return 2


def _cmd_upgrade(args) -> int:
    from .store import FORMAT_VERSION, read_manifest, upgrade

    before = read_manifest(args.index_dir).format_version
    if upgrade(args.index_dir):
        print(f"upgraded: {args.index_dir}: format version {before} -> {FORMAT_VERSION}")
    else:
        print(f"ok: {args.index_dir}: already format version {FORMAT_VERSION}")
    return 0


_COMMANDS = {"index": _cmd_index, "search": _cmd_search, "evaluate": _cmd_evaluate, "info": _cmd_info,
             "verify": _cmd_verify, "upgrade": _cmd_upgrade}


def _one_line(text: str) -> str:
    """``text`` on one line: its lines joined with " | " (a message must never span lines)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return " | ".join(lines)


def _error(args, message: str, kind: str = "error") -> None:
    """The one line of a failure: ``plaid <command>: error: <message>``."""
    command = getattr(args, "command", None)
    prog = f"plaid {command}" if command else "plaid"
    print(f"{prog}: {kind}: {_one_line(message)}", file=sys.stderr, flush=True)


def _describe(e: BaseException) -> str:
    """The message of an expected failure (input, files, memory)."""
    if isinstance(e, MemoryError):
        return f"out of memory{': ' + _one_line(str(e)) if str(e) else ''} (a smaller input, --k or --batch-size?)"
    if isinstance(e, UnicodeError):
        return f"not UTF-8 text ({_one_line(str(e))})"
    return _one_line(str(e)) or type(e).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None):
    text = _one_line(str(message)) or category.__name__
    logger.warning("warning: %s", text)


class _StderrHandler(logging.Handler):
    """Writes ``plaid: <message>`` lines to the current ``sys.stderr`` (looked up at each record, so
    that a replaced stderr, as in tests, is honoured), through ``tqdm.write`` so that a progress bar
    on the terminal is not broken by a note."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("plaid: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            stream = sys.stderr
            try:
                from tqdm import tqdm

                tqdm.write(msg, file=stream)
            except ImportError:  # pragma: no cover - tqdm is a dependency
                stream.write(msg + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


class _LoggingSetup:
    """The ``plaid`` logger configured for one :func:`main` call, and restored after it."""

    def __init__(self) -> None:
        self.logger = logging.getLogger("plaid")
        self.saved = (self.logger.level, self.logger.propagate)
        self.handler: Optional[logging.Handler] = None

    def start(self, quiet: bool) -> None:
        if not any(isinstance(h, _StderrHandler) for h in self.logger.handlers):  # main() within main()
            self.handler = _StderrHandler()
            self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.WARNING if quiet else logging.INFO)
        self.logger.propagate = False  # printed once, here, not again by a handler of the root logger

    def stop(self) -> None:
        if self.handler is not None:
            self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]


def _stdout_closed() -> None:
    """After a broken pipe on stdout: point it at /dev/null so that the interpreter's final flush is quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (tests): nothing to silence
        pass


def main(argv: Optional[List[str]] = None) -> int:
    """Run the ``plaid`` command with ``argv`` (default: ``sys.argv[1:]``); returns the exit code.

    Every failure is one line on stderr and exit code 2 (see the module docstring); ``--help`` and
    ``--version`` raise ``SystemExit(0)`` as argparse does.
    """
    parser = build_parser()
    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    logs = _LoggingSetup()
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            raise _UsageError(f"plaid: error: a command is required: {', '.join(_COMMANDS)} (see plaid --help)")
        logs.start(quiet=args.quiet)
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's final flush
        return code
    except _UsageError as e:
        print(_one_line(str(e)), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _stdout_closed()
        return 141
    except (PlaidError, OSError, ValueError, MemoryError) as e:
        _error(args, _describe(e))
        return 2
    except Exception as e:  # noqa: BLE001 - a bug: still one line, and no traceback
        _error(args, f"{type(e).__name__}: {_describe(e)} (please report it)", kind="internal error")
        return 2
    finally:
        logs.stop()
        warnings.showwarning = old_show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
