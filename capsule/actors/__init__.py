"""Actors: mailboxes, names and routing of messages between running tasks, and
ask/reply correlation.

Non-blocking by design: an operation that would have to wait (a full mailbox,
an empty one, a reply not yet sent) says so, and registers who to wake when it
could succeed. The supervisor owns the waiting (and its cancellation).
"""
