"""Outcomes shared by every front end (CLI exit codes, REST API statuses)."""

from __future__ import annotations

OK = 0
FAILED = 1        # the operation was tried and did not succeed
BAD_INPUT = 2     # usage error, invalid value, missing file; nothing changed
NOT_FOUND = 3     # unknown VM or host
REFUSED = 4       # refused as unsafe or conflicting; nothing changed
NO_QUORUM = 5     # the quorum service (etcd) cannot be reached

HTTP_STATUS = {FAILED: 500, BAD_INPUT: 400, NOT_FOUND: 404, REFUSED: 409, NO_QUORUM: 503}


class FtvmError(Exception):
    """A request that failed or was refused, with the outcome code and a clear message."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


class Problem(str):
    """Why a request is refused, as the pure checks (core/) say it, with the outcome it is:
    BAD_INPUT unless the check says otherwise (a name taken: REFUSED; an unknown host:
    NOT_FOUND). A str, so it reads and joins like the message it is."""

    code: int

    def __new__(cls, message: str, code: int = BAD_INPUT) -> Problem:
        obj = super().__new__(cls, message)
        obj.code = code
        return obj
