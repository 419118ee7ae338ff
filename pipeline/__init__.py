"""landmark-index: distributed batch indexing for landmark image retrieval."""

__version__ = "0.1.0"
