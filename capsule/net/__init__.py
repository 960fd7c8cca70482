"""The network, as the host reaches it for tasks: HTTP requests checked against
each task's grants, and redaction of secrets before anything is recorded."""
