"""Runs one program through the host API, without a journal, for a benchmark that
measures its process from outside (benchmarks/actors.py):

    python3 benchmarks/host_run.py OPTIONS_JSON PROGRAM [ARGS...]

writes the run's events to stdout as JSON lines, as `capsule run --events jsonl`
does (the last one `run_ended`, with the run's outcome), and sends
the task `main` the message "go" for each line that comes on stdin. (Every core
runs this way: `--core async` does not journal runs yet, and without a journal
`capsule send` cannot reach a run.)"""

from __future__ import annotations

import sys

import anyio

from capsule.host import Runtime
from capsule.host.handle import RunHandle
from capsule.supervisor.events import event_json
from capsule.supervisor.options import RunOptions

#: Events the run's handle keeps unread: all of them, for the benchmark reads
#: each one (tens of thousands for 5,000 actors).
EVENT_BUFFER = 10_000_000


async def relay_go_aheads(handle: RunHandle) -> None:
    while await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True):
        await handle.send("main", "go")


async def run(options_json: str, program: str, args: list[str]) -> None:
    options = RunOptions.model_validate_json(options_json)
    async with Runtime(journal=False, event_buffer=EVENT_BUFFER) as runtime:
        handle = await runtime.start(program, *args, options=options)
        async with anyio.create_task_group() as relays:
            relays.start_soon(relay_go_aheads, handle)
            async for event in handle.events():
                print(event_json(event), flush=True)
            relays.cancel_scope.cancel()


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    anyio.run(run, sys.argv[1], sys.argv[2], sys.argv[3:])


if __name__ == "__main__":
    main()
