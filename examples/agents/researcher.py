"""An agent that calls an LLM API through ``capsule.http``.

The planner (``main``) asks the model for an outline, then one child per point,
in parallel, expands it. Each call runs in its own sandbox, which can reach only
the API's host (``allowed_hosts``) and read only the API key (``env``); a failed
call is retried in a fresh sandbox, and a resumed run replays journaled
responses instead of paying for them twice.

    python examples/agents/llm_demo.py   # starts a local stand-in API, then runs this
"""

import os

from capsule import gather, task
from capsule.http import post


@task(allowed_hosts=["127.0.0.1"], env=["LLM_API_KEY"], max_retries=2, timeout="30s")
def complete(api: str, prompt: str) -> str:
    response = post(
        f"{api}/v1/chat/completions",
        json={"model": "stand-in", "messages": [{"role": "user", "content": prompt}]},
        headers={"Authorization": f"Bearer {os.environ.get('LLM_API_KEY', '')}"},
        timeout=10,
    )
    if not response.ok():
        raise RuntimeError(f"the LLM API answered {response.status_code}: {response.text()}")
    return response.json()["choices"][0]["message"]["content"]


@task(name="main", timeout="2m")
def main(api: str = "http://127.0.0.1:8808", topic: str = "sandboxed agents") -> dict:
    outline = complete(api, f"Outline three points about {topic}")
    points = [line.removeprefix("- ") for line in outline.splitlines() if line.startswith("- ")]
    sections = gather(*[complete.spawn(api, f"Expand: {point}") for point in points])
    return {"topic": topic, "sections": sections}
