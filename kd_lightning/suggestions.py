"""Close matches of a mistyped name, for error messages that say what was probably meant."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_matches(word: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """The candidates closest to ``word`` (case-insensitive), best first."""
    lowered = {str(c).lower(): str(c) for c in dict.fromkeys(candidates)}
    return [lowered[m] for m in difflib.get_close_matches(str(word).lower(), list(lowered), n=n, cutoff=0.6)]


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'a' or 'b'?)`` for the close matches of ``word``, or an empty string."""
    matches = close_matches(word, candidates)
    return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""
