"""The sandbox: the wasmtime engine, the guest runtime's build and cache, one
fresh instance per task invocation with host-enforced limits (fuel, memory,
deadline), and the host imports the guest calls.

Knows nothing of retries or the task tree: a caller hands it a task, arguments,
limits and what the task runs within (which it asks whether the task must stop),
and gets back a result or a classified failure.
"""
