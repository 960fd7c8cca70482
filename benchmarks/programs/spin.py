"""A CPU-bound loop that only a deadline can stop."""

from capsule import task


@task(name="main", compute="HIGH", timeout="200ms", max_retries=0)
def main() -> None:
    while True:
        pass
