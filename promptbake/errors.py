"""One exception type for every problem a user can fix.

The CLI turns a `PromptbakeError` into a single line on stderr and exit code 2; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class PromptbakeError(Exception):
    """A user-facing error: the message names the file, line or key at fault."""
