"""Exceptions of the SDK. Verification never raises: it answers a ``Rejected`` (see ``result``).

These are for the building side (issuing credentials, tokens and holder codes) and for
``decode_code``, where a caller asked for a parse and a bad input is the caller's error.
"""
from __future__ import annotations


class CodeError(Exception):
    """The base of every exception the SDK raises."""


class MalformedCode(CodeError, ValueError):
    """The text or bytes are not a well-formed OC1 code (prefix, Base45, layout or field ranges)."""


class IssueError(CodeError, ValueError):
    """A credential, token batch or holder code cannot be built from these arguments.

    Raised before anything is signed, e.g. a validity longer than 72 h or a purpose the
    credential does not allow.
    """
