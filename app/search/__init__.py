"""Exact nearest-neighbour search over the stored face embeddings, in memory, without torch."""
