"""The program ``Runtime.run_code`` runs: the code it is given, executed as
its one task in a fresh sandbox. The task declares the most it could get; the
host caps it to the caller's limits."""

from typing import Any

from capsule import task


@task(name="main", compute=2**62, ram="4GB", max_retries=0)
def main(source: str, args: list[Any]) -> Any:
    namespace: dict[str, Any] = {"__name__": "__main__", "args": args}
    exec(compile(source, "<code>", "exec"), namespace)
    return namespace.get("result")
