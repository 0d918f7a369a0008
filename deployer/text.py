"""Text that came from a board or a user's file, made safe to keep and to show: the one implementation.

A board is untrusted, and so is what it writes into names, keys, logs and messages: an escape sequence
printed raw clears a terminal or retitles its window, a carriage return hides what came before it. Every
such string goes through `visible` (multi-line text: build logs, error messages) or `one_line` (names,
paths, keys) before it is kept, shown or written into a report: control characters become their visible
`\\x1b`-style escapes, and the length is bounded.
"""

from __future__ import annotations


def _escaped(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


def visible(text: str, limit: int) -> str:
    """`text` with every control character but newline and tab written as its escape, at most `limit` long."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if text.isprintable():
        return text
    clean = "".join(c if c.isprintable() or c in "\n\t" else _escaped(c) for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def one_line(text: str, limit: int) -> str:
    """A name or path on one line: every control character, newlines too, written as its escape."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    if text.isprintable():
        return text
    clean = "".join(c if c.isprintable() else _escaped(c) for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."
