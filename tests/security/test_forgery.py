"""A task cannot pass for another: it cannot register a name that is another
task's id (and take its messages), nor answer, after a resume, an ask it was
not asked; on either core."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from tests.conftest import capsule_cli, kill_at_marker
from tests.security.support import core_flags, write


def test_after_a_resume_only_the_task_asked_can_answer_an_ask(tmp_path: Path, core: str) -> None:
    """Asks in flight when a run stopped may be answered, after the resume,
    before the asker asks again (its replayer may be faster): such early
    replies were taken from any task, a replayed reply step that had been
    refused included. A task that guessed the ask's id (ids are
    deterministic) answered in place of the task asked."""
    write(
        tmp_path,
        """
        from capsule import ask, receive, task
        from componentize_py_types import Err
        from wit_world.imports import messaging

        @task(name="oracle", restart="temporary")
        def oracle():
            receive()
            print("MARK oracle has the question", flush=True)
            receive()  # never answers

        @task(name="evil", restart="temporary")
        def evil():
            for number in range(1, 4):  # refused now; replayed after the resume
                try:
                    messaging.reply(f"main#{number}", '"forged"')
                except Err:
                    pass
            receive()

        @task(name="main", compute="HIGH", timeout="60s", max_retries=0)
        def main():
            evil.spawn()
            target = oracle.spawn()
            total = 0
            for number in range(1_000_000):  # evil's replay comes first
                total += number
            try:
                return ask(target, "question", timeout=2)
            except Exception as error:
                return f"no reply: {type(error).__name__}"
        """,
    )
    printed, code = kill_at_marker(["run", "prog.py", *core_flags(core)], "MARK", tmp_path)
    assert code == -signal.SIGKILL, printed
    done = capsule_cli("resume", "--last", cwd=tmp_path)
    assert "forged" not in done.stdout, done.stdout
    assert done.stdout.startswith("no reply"), (done.stdout, done.stderr[-2000:])


def test_a_task_cannot_register_under_another_tasks_id(tmp_path: Path, core: str) -> None:
    """Targets are looked up as registered names first, then as task ids: a
    child registered under the id of another task got every message sent to
    that task, and answered its asks."""
    program = write(
        tmp_path,
        """
        import capsule
        from capsule import ask, receive, send, task

        @task(name="critic", restart="temporary")
        def critic():
            while True:
                receive().reply("genuine review")

        @task(name="impostor", restart="temporary")
        def impostor():
            while True:
                message = receive()
                if message.expects_reply:
                    message.reply("forged review")

        @task(name="evil", restart="temporary")
        def evil(victim_id, parent_id):
            try:
                impostor.spawn(name=victim_id)
                outcome = "registered"
            except capsule.TaskError as error:
                outcome = f"refused: {error.message}"
            send(parent_id, outcome)
            receive()

        @task(name="main", timeout="30s", max_retries=0)
        def main():
            critic_handle = critic.spawn()
            evil.spawn(critic_handle.id, capsule.current().id)
            outcome = receive().body
            return [outcome, ask(critic_handle, "please review", timeout=10)]
        """,
    )
    done = capsule_cli("run", str(program), "--json", *core_flags(core), cwd=tmp_path)
    outcome, review = json.loads(done.stdout)["result"]
    assert review == "genuine review"
    assert outcome.startswith("refused") and "task id" in outcome, outcome
