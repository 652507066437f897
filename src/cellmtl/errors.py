"""Errors that the CLI turns into exit codes.

A `BadInputError` is the user's to fix (a file, a manifest row, a config key): the CLI prints one
``error: ...`` line and exits 2, without a traceback. Anything else is our bug and exits 1.
"""


class BadInputError(Exception):
    """Bad config, manifest or image. The message must name the culprit (file, row, key, value)."""


class TrainingError(Exception):
    """A run that cannot go on (e.g. repeated non-finite losses); exits 1 with one ``error:`` line."""


class ExportError(Exception):
    """An exported package that fails its own validation: our bug, not the user's; exits 1 with one
    ``error:`` line naming the failed checks and where the package was left for inspection."""


MAX_NAMED = 5  # culprits quoted in one error line; the rest are counted


def all_culprits(errors: list[str], what: str) -> BadInputError:
    """One error for several culprits (bad rows, unreadable stacks), so a user fixes them in one pass: a
    single one as it is, else `what` with the count, the first MAX_NAMED quoted and the rest counted."""
    if len(errors) == 1:
        return BadInputError(errors[0])
    more = f"; and {len(errors) - MAX_NAMED} more" if len(errors) > MAX_NAMED else ""
    return BadInputError(f"{what}: {len(errors)} problems: {'; '.join(errors[:MAX_NAMED])}{more}")
