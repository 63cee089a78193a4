"""The one error type for user mistakes (a bad flag, file, row or setting), so every CLI edge can tell
them from bugs: a UserError ends the command with its one-line message and exit code 2, a bug keeps its
traceback. Messages name the file, line or flag and say how to fix it."""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's input; `str(exc)` names the file/line/flag and the fix."""


class MissingFileError(UserError, FileNotFoundError):
    """An input file or folder the user named does not exist (still a FileNotFoundError for callers)."""


class ImageReadError(UserError):
    """An image file that cannot be read (corrupt, unsupported, too large); the message names the file and the fix."""
