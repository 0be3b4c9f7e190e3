"""Evaluation: FID with the real Inception-v3, class alignment, timing."""
