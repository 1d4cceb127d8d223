"""The two errors every front end (the CLI, the web page, the subcommands) reports as one line."""


class UserError(Exception):
    """A mistake in what the user asked for: reported as one line, exit code 2."""


class RunFailure(Exception):
    """A run that failed for a reason outside the arguments (disk full, numbers overflowed): one line, exit 1."""
