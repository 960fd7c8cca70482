from capsule import task


@task(name="analyze_data", compute="MEDIUM", ram="512MB", timeout="30s", max_retries=1)
def analyze_data(dataset: list) -> dict:
    return {"processed": len(dataset), "status": "complete"}


@task(name="main", compute="HIGH")
def main() -> dict:
    return analyze_data([1, 2, 3, 4, 5])
