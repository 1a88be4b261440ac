import numpy as np

import plaid


def test_build_and_search_small(small_index, small_corpus):
    docs, queries = small_corpus
    res = plaid.Searcher(small_index).search(queries, k=10)
    exact = plaid.maxsim(queries, docs)
    assert res.ids.shape == (len(queries), 10)
    # the exact best document is found for most queries
    assert np.mean(res.ids[:, 0] == exact.argmax(1)) >= 0.9
