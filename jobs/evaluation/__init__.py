"""Evaluating a model on an eval set: embedding (locally or on Ray), scoring, pictures."""
