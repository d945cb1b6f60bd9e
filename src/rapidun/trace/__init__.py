"""Find the culprits: trace a behaviour back to the training records that taught it (``rapidun trace``).

:mod:`.stream` streams cached corpus sketches against probe sketches with a running top-k; :mod:`.metrics` holds
the retrieval metrics and the BM25 baseline; :mod:`.core` ties them to the influence engine; :mod:`.command` is the
CLI and its outputs.
"""
