"""A task that prints ``lines`` lines of ``width`` characters (an agent logging)."""

from capsule import task


@task(name="main", compute="HIGH", timeout="10m")
def main(lines: str = "10000", width: str = "1000") -> int:
    text = "x" * int(width)
    for i in range(int(lines)):
        print(i, text)
    return int(lines)
