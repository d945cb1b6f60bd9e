"""Did it really forget? The verification battery (``rapidun verify``, ``verify.enabled`` in ``compare``).

:mod:`.battery` runs the attacks on one model as resumable cells and summarises them against the poisoned model and
the retrain reference; :mod:`.fuzz`, :mod:`.quantize` and :mod:`.forget_quality` are the attacks' parts.
"""

from rapidun.verify.battery import ATTACKS, Battery, summarise, verify_battery

__all__ = ["ATTACKS", "Battery", "summarise", "verify_battery"]
