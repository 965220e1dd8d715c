"""The errors a user can act on (a bad config value, missing shards, an unknown model family, a corrupt checkpoint).

Every one derives from `MMBlocksError`, so the command line can print them as one line while a programming bug (a
`TypeError` or `KeyError` from inside the package) still ends in its full traceback. Each also derives from the
built-in exception it refines (`ValueError`, `FileNotFoundError`, ...), so ``except ValueError`` keeps working.
This module imports nothing from `mmblocks`: every floor may raise these.
"""

from __future__ import annotations

from tokenizers_mm.registry import RegistryError

__all__ = ["USER_ERRORS", "DataError", "MMBlocksError"]


class MMBlocksError(Exception):
    """Base class of the package's user-facing errors: the message says what was expected and what came."""


class DataError(MMBlocksError, FileNotFoundError):
    """Shards that are missing or that cannot feed the run (no samples, fewer samples than one batch, ...)."""


#: What `mmblocks` (the CLI) reports in one line: ours, and an unknown registry name or argument.
USER_ERRORS: tuple[type[BaseException], ...] = (MMBlocksError, RegistryError)
