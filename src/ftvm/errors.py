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
