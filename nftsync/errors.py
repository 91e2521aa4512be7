"""Errors a user can cause: each carries a one-line message; the CLI prints it, exits non-zero."""

from __future__ import annotations


class NftsyncError(Exception):
    """Base of every error that is the user's input or environment, not a bug in nftsync."""

    exit_code = 1


class NotRootError(NftsyncError):
    exit_code = 77


class RulesetError(NftsyncError):
    """A ruleset file is missing, malformed, or rejected by libnftables/the kernel."""

    exit_code = 2


class SessionError(NftsyncError):
    """A session operation names a farm, key or backend that does not fit the session map."""

    exit_code = 2


class KernelError(NftsyncError):
    """The kernel refused a transaction we built; the transaction was not applied."""

    exit_code = 3
