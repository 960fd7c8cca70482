"""The SDK: what user code imports, the ``@task`` decorator, ``TaskError`` and
``current()``.

Pure Python with no host dependencies: it runs inside the sandbox (where the guest
runtime installs a backend that routes task calls to the host) and, for unit tests,
in plain Python (where local mode's backend runs tasks in-process: ``local``).
"""
