"""Whether a failed attempt may be retried, as far as the failure itself goes
(the task's budget of retries and its restart type are the supervisor's).

Two words count: the host's, by kind (what a retry cannot fix), and the
guest's, which knows the exception's classes (``capsule.NonRetryable``, the
task's ``retry_on``/``no_retry_on``, a programming error such as a module that
does not exist). The guest can only make a failure less retryable: a kind the
host never retries stays so whatever the guest says.
"""

from __future__ import annotations

from capsule.sandbox.engine import ErrorInfo

#: Kinds that a retry cannot fix (a guest that broke the protocol, or wrote
#: more than it may, gets no second chance either).
NOT_RETRYABLE = frozenset({"cancelled", "bad_arguments", "divergence", "protocol", "output_limit"})


def retryable(error: ErrorInfo) -> bool:
    """Whether another attempt could end otherwise than the one that failed with ``error``."""
    return error.retryable and error.kind not in NOT_RETRYABLE
