"""The errors a user can act on (a bad config value, missing shards, an unknown model family, a corrupt checkpoint).

Every one derives from `MMBlocksError`, so the command line can print them as one line while a programming bug (a
`TypeError` or `KeyError` from inside the package) still ends in its full traceback. Each also derives from the
built-in exception it refines (`ValueError`, `FileNotFoundError`, ...), so ``except ValueError`` keeps working.
This module imports nothing from `mmblocks`: every floor may raise these.
"""

from __future__ import annotations

from tokenizers_mm.registry import RegistryError

__all__ = ["USER_ERRORS", "DataError", "MMBlocksError", "MissingShardsError"]


class MMBlocksError(Exception):
    """Base class of the package's user-facing errors: the message says what was expected and what came."""


class DataError(MMBlocksError, RuntimeError):
    """Shards that cannot feed the run (a split with no samples, fewer samples than one batch, ...)."""


class MissingShardsError(DataError, FileNotFoundError):
    """No shards (no ``index.json``) where the config says they are, and no offline dataset named to make them."""


#: What `mmblocks` (the CLI) reports in one line: ours, and an unknown registry name or argument.
USER_ERRORS: tuple[type[BaseException], ...] = (MMBlocksError, RegistryError)
