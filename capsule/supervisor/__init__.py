"""The supervisor: the tree of task invocations of one run, their lifecycle
(pending -> running -> completed | failed, through retrying), retries with
exponential backoff, and the typed event stream that reports it all; and the
options a run is given (RunOptions), which size and bound it.

It decides what runs and when; the sandbox decides how one attempt runs.
"""
