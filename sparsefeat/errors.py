"""The one exception type users see.

Every error a user can cause (a bad path, a wrong width, a missing site, a NaN loss) is raised as
`SparsefeatError` with a one-line message that names the file and what is wrong; the CLI prints
that line and exits with status 2, never a traceback.
"""


class SparsefeatError(Exception):
    """A user-facing error: its message is one line, complete in itself."""


class ConfigError(SparsefeatError, ValueError):
    """A configuration value is missing, of the wrong type or out of range (CLI flag, TOML key or
    dataclass field). A ValueError too, so code that validated configs before still catches it."""
