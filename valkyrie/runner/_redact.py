"""Replacing a job's secret values with ``***`` in what its runner publishes (logs, result)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from schemas import REDACTED

__all__ = ["MIN_SECRET_CHARS", "Redactor"]

#: values (and lines of multi-line values) shorter than this are not looked for: replacing every
#: "1" or "on" in a log would destroy it without hiding anything worth hiding
MIN_SECRET_CHARS = 4


class Redactor:
    """Finds an attempt's secret values in text and replaces each with ``***``.

    Each value is looked for whole and, for a value of several lines, line by line (a log line
    holds one line of it). Only literal occurrences are found: a value the job encodes (base64,
    URL quoting) or prints in pieces is not recognised.
    """

    def __init__(self, values: Iterable[str]) -> None:
        words: set[str] = set()
        for value in values:
            for word in (value, *value.splitlines()):
                word = word.strip()
                if len(word) >= MIN_SECRET_CHARS:
                    words.add(word)
        # longest first: a value that contains another is replaced whole
        ordered = sorted(words, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def __bool__(self) -> bool:
        return self._pattern is not None

    def __call__(self, text: str) -> str:
        """``text`` with every secret value replaced by ``***``."""
        if self._pattern is None:
            return text
        return self._pattern.sub(REDACTED, text)
