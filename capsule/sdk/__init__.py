"""The SDK: what user code imports, the ``@task`` decorator, ``TaskError`` and
``current()``.

Pure Python with no host dependencies: it runs inside the sandbox (where the guest
runtime installs a backend that routes task calls to the host) and, for local unit
tests, in plain Python (where a task call is a plain function call).
"""
