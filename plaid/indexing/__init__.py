"""Index construction: k-means (``kmeans``), residual codecs (``codecs``), the pipeline (``indexer``)."""
