"""The durable journal: every event, host-call step, message and task outcome of
a run in SQLite (WAL), so that a run that stopped resumes where it was; and the
reading side (``capsule runs``, ``capsule inspect``, resume's history)."""
