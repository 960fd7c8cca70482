"""A small multi-agent workflow: a planner, workers, a critic, and supervision.

- The planner (``main``) starts a long-lived critic under the name "critic", then
  one worker per topic, in parallel (``map``).
- Each worker drafts a section and asks the critic for a verdict (``ask``); the
  critic asks for rework until the draft is good enough.
- One worker crashes on its first attempt; its supervisor (the planner) restarts
  it in a fresh sandbox, and the rerun succeeds.
- When the planner returns, the critic (still waiting for drafts) is cancelled:
  no task outlives the run.

No network: the "writing" is deterministic string work, so the output is stable.

    capsule run examples/agents/main.py
"""

import capsule
from capsule import ask, receive, task

TOPICS = ["isolation", "durability", "scheduling"]


@task(restart="permanent", compute="MEDIUM")
def critic() -> None:
    """Reviews drafts forever: asks for rework until a draft has enough detail."""
    while True:
        message = receive()
        draft = message.body["draft"]
        if len(draft.split()) < 12:
            message.reply({"verdict": "rework", "note": "too thin: add a concrete example"})
        else:
            message.reply({"verdict": "accept"})


@task(compute="MEDIUM", max_retries=2)
def worker(topic: str) -> dict:
    """Drafts one section, revising it until the critic accepts it."""
    me = capsule.current()
    if topic == "durability" and me.attempt == 1:
        raise RuntimeError("worker crashed while drafting (simulated)")
    draft = f"{topic.capitalize()} matters for agents."
    revisions = 0
    while True:
        verdict = ask("critic", {"topic": topic, "draft": draft}, timeout=10)
        print(f"{topic}: revision {revisions} -> {verdict['verdict']}")
        if verdict["verdict"] == "accept":
            return {"topic": topic, "revisions": revisions, "attempt": me.attempt, "text": draft}
        revisions += 1
        draft += f" For example, {topic} keeps one failing agent from taking the others down."


@task(name="main", strategy="one_for_one", max_restarts=3, restart_window="10s")
def main() -> dict:
    critic.spawn(name="critic")
    sections = worker.map(TOPICS)
    return {
        "sections": [
            {key: section[key] for key in ("topic", "revisions", "attempt")} for section in sections
        ],
        "words": sum(len(section["text"].split()) for section in sections),
    }
