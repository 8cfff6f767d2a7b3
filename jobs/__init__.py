"""Thin entry points, one readable file per job."""
