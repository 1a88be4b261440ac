"""Search: the PLAID stages (``stages``) and their orchestration (``searcher``)."""
