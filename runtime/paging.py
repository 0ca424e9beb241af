"""Cursor pages as every service answers them: a page size with a default and a ceiling, and an
opaque page token that holds the position (a sequence or a version) the next page starts below
or after."""

from __future__ import annotations

from runtime.errors import InvalidArgument


def page_size(requested: int, *, default: int, maximum: int) -> int:
    """0 means the default; more than the maximum is the maximum; negative is refused."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
    return min(requested or default, maximum)


def parse_page_token(token: str) -> int | None:
    """The position a page token holds; None for the first page."""
    if not token:
        return None
    try:
        value = int(token, 16)
    except ValueError:
        raise InvalidArgument("bad page_token", reason="INVALID_PAGE_TOKEN") from None
    if value <= 0:
        raise InvalidArgument("bad page_token", reason="INVALID_PAGE_TOKEN")
    return value


def page_token(position: int) -> str:
    return format(position, "x")
