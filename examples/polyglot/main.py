"""A Python workflow that calls TypeScript tasks (tools.ts), which call back
into Python: one run, one journal, one task tree. capsule.toml lists tools.ts."""

import capsule
from capsule import task

#: Declared in tools.ts.
headline = capsule.task_ref("headline")


@task(name="shout")
def shout(text: str) -> str:
    return text.upper() + "!"


@task(name="main")
def main() -> dict:
    titles = ["capsule runs typescript", "and python, in one run"]
    return {"headlines": headline.map(titles)}
