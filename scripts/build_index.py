#!/usr/bin/env python
"""Build a plaid index from a corpus: the documented script, a thin wrapper over ``plaid index``.

    python scripts/build_index.py INDEX_DIR --embeddings BUNDLE_DIR
    python scripts/build_index.py INDEX_DIR --corpus corpus.jsonl --checkpoint MODEL_DIR [--save-embeddings DIR]

Every option of ``plaid index`` applies (``python scripts/build_index.py --help``). It runs the same
code as the command (``plaid.pipeline.build_index``), with the same exit codes: 0 success,
2 usage or input error (one line on stderr).
"""
import sys

from plaid.cli import main

if __name__ == "__main__":
    sys.exit(main(["index", *sys.argv[1:]]))
