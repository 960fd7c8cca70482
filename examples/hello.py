from capsule import task


@task(name="main", compute="LOW", ram="64MB")
def main() -> str:
    return "Hello from Capsule!"
