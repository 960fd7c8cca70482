"""The supervisor: the tree of task invocations of one run, their lifecycle
(pending -> running -> completed | failed, through retrying), retries with
exponential backoff, and the typed events that report it all (a public,
versioned schema: docs/events.md) with the stream that carries them.

It decides what runs and when; the sandbox decides how one attempt runs.
"""
