"""The one error type for "the user asked for something this stack cannot do".

Library code (models/ and p2p/) raises `UserError` for every bad input a person can type or point to: a
word that is not in the prompt, a size the UNet cannot take, a missing or malformed checkpoint, an image
Pillow cannot read. The scripts' entry-point wrapper (`scripts/_cli.py`) prints such an error as one line,
`error: <message>`, and exits with status 2; every other exception is a bug and keeps its traceback.
It subclasses ValueError, so callers that catch ValueError keep working.
"""


class UserError(ValueError):
    """Bad input from the user; the message names the value and what would be accepted."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (a checkpoint, an image, a sweep folder)."""


class OutputExistsError(UserError, FileExistsError):
    """Writing would replace an earlier output; outputs are never silently overwritten."""


class WrongTypeError(UserError, TypeError):
    """A value of the wrong kind (a string where a list of prompts belongs, a list where one number does)."""


def number(value, *, name: str, kind: type = float):
    """A command-line value as an int or a float, or an error naming it (steps=abc, steps=2.5, guidance=true)."""
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        converted = kind(value)
        if kind is int and converted != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}") from None
    return converted
