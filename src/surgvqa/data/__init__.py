"""Data: the record type, source readers, the image-level split, question typing, synthetic data."""
