"""Exceptions that map onto the CLI's exit status (docs/ARCHITECTURE.md: 0 ok, 1 a check failed, 2 bad input)."""
from __future__ import annotations


class UserError(ValueError):
    """Bad input: the message names the thing, the expected and the actual value. CLI exit status 2."""


class CheckFailed(RuntimeError):
    """A check (parity, quality threshold) ran and failed. CLI exit status 1."""
