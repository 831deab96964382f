"""States: the batch layout, sampling, decoders, the prefix axis, and the scoring seam to the fast path."""
