"""Evaluation: validation bits per byte and samples, the CORE bundle and metric."""
