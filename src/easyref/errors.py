"""The two errors every front end (the CLI, the web page, the subcommands) reports as one line."""

import unicodedata


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class RunFailure(Exception):
    """A run that failed for a reason outside the arguments (disk full, numbers overflowed): one line, exit 1."""


def one_line(text: str) -> str:
    """`text` as one printable line: control characters (a newline, a terminal escape) and lone surrogates,
    which a hostile record or file name can carry into a message, are shown as escapes."""
    return "".join(c.encode("unicode_escape").decode("ascii") if _unprintable(c) else c for c in text)


def _unprintable(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp")
