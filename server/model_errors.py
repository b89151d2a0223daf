"""Why a model call failed: one exception tree, each kind saying what it means::

    ModelFailure
    ├── ModelInputError (the rows are ours to fix)
    └── ModelCallError ─┬─ ModelTimeout, ModelNoTime, ModelBreakerOpen, ModelResponseError
                        └─ ModelUnavailable ─── ModelBusy

Each kind sets ``code`` (the decision's reason code when it ends the lane), ``retry`` and
``counts_against_replica`` (each explained where defined). The codes: docs/metrics.md.
"""

from __future__ import annotations

from typing import ClassVar

from core.deadline import counts_as_timeout
from core.domain import Reason


class ModelFailure(Exception):
    """The message is a fragment of the decision's reason ("timed out after ...")."""

    # The reason code of a decision the ladder answered after this failure, its lane's
    # last (in its answer, its audit record and decision_fallbacks_total); a breaker's
    # refusal after another failure keeps that one's code (``server.router``).
    code: ClassVar[Reason] = Reason.MODEL_ERROR
    # Whether a call to the next replica after this is a retry, which the retry budget
    # bounds (False: the next replica's call, if there is one, is a first call).
    retry: ClassVar[bool] = True

    @property
    def counts_against_replica(self) -> bool:
        """Whether the replica's breaker counts it."""
        return True


class ModelInputError(ModelFailure):
    """The replica rejected the rows (wrong width, non-finite value): any replica would,
    so the lane stops at once."""

    code = Reason.MODEL_INPUT
    retry = False

    @property
    def counts_against_replica(self) -> bool:
        return False


class ModelCallError(ModelFailure):
    """A replica failed to score."""


class ModelTimeout(ModelCallError):
    code = Reason.MODEL_TIMEOUT

    def __init__(self, message: str, *, given_ms: float) -> None:
        super().__init__(message)
        self.given_ms = given_ms  # how long the replica had to answer

    @property
    def counts_against_replica(self) -> bool:
        return counts_as_timeout(self.given_ms)


class ModelNoTime(ModelCallError):
    """Not sent: the request waited in the replica's queue (``server.batching``) while
    every call it may have out was out, until too little of its time was left for one.
    Sent anyway it would only queue in the replica behind the calls already there, and a
    slow replica sent one call per waiting request falls behind until every call times
    out; the next replica's call is a first call."""

    code = Reason.MODEL_NO_TIME
    retry = False

    @property
    def counts_against_replica(self) -> bool:
        return False


class ModelBreakerOpen(ModelCallError):
    """Not sent: the replica's breaker refused the call."""

    code = Reason.MODEL_BREAKER_OPEN
    retry = False

    @property
    def counts_against_replica(self) -> bool:
        return False


class ModelUnavailable(ModelCallError):
    """Connection refused or reset, or an error status from the replica."""

    code = Reason.MODEL_UNAVAILABLE


class ModelBusy(ModelUnavailable):
    """Not sent: the replica still works on its bound of calls nobody waits for.

    ``silent_ms``: how long the replica has answered nothing, from when the oldest of
    those calls was abandoned (0 when it answered since). Calls given a few milliseconds
    each are abandoned faster than a healthy but slowed replica answers any, so only a
    silence as long as a timeout that counts (a hung replica) is the replica's fault.
    """

    code = Reason.MODEL_BUSY

    def __init__(self, message: str, *, silent_ms: float) -> None:
        super().__init__(message)
        self.silent_ms = silent_ms

    @property
    def counts_against_replica(self) -> bool:
        return self.silent_ms > 0 and counts_as_timeout(self.silent_ms)


class ModelResponseError(ModelCallError):
    """An answer we cannot use (wrong count, bad encoding)."""
