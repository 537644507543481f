"""When a repeating problem is worth another log line.

Why: some problems repeat per batch or per call for as long as they last (a policy that
raises, a peer that stops reading). One line per occurrence floods the log and costs CPU
on the datapath; one line in all hides that it goes on. Logging the 1st, 2nd, 4th, 8th, …
occurrence keeps both the news and the scale, with no timer and no state beyond the count
the caller keeps anyway.
"""
from __future__ import annotations


def worth_logging(occurrence: int) -> bool:
    """True for the 1st, 2nd, 4th, 8th, … occurrence (a power of two); False otherwise."""
    return occurrence > 0 and occurrence & (occurrence - 1) == 0
