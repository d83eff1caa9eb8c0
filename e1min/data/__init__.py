"""Data pipeline: files -> records -> batches."""
