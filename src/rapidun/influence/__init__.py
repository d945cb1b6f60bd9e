"""Influence estimation: per-sample gradient sketches and their inner products."""
