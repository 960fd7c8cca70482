"""The workflow the example service runs per request: a draft is written, a
human approves or rejects it (a message sent through the service), and the
verdict is the result."""

from capsule import receive, task


@task(name="draft", compute="LOW", ram="64MB")
def draft(topic: str) -> str:
    return f"A short note about {topic}."


@task(name="main", compute="MEDIUM", ram="128MB", timeout="1h")
def main(topic: str) -> dict:
    text = draft(topic)
    print(f"waiting for a verdict on: {text}")
    # The service's POST /runs/{id}/messages delivers the human's decision.
    verdict = receive(timeout=3600).body
    approved = isinstance(verdict, dict) and verdict.get("approved") is True
    return {"text": text, "approved": approved}
