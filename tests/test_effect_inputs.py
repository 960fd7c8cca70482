"""An effect's inputs are durable before the effect leaves the process: a run
killed with -9 while its HTTP request is in flight (sent, not answered) sends
it again on resume with the same inputs, here an idempotency key the task drew
from ``uuid4`` (a random read the host served and journaled) just before."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import LocalServer, PaymentServer, killed_in_flight_then_resumed

BLOCKING = """
import uuid
from capsule import task
from capsule.http import get, post

@task(name="main", allowed_hosts=["127.0.0.1"])
def main(url: str) -> str:
    get(url)
    key = str(uuid.uuid4())
    return post(url, json={"amount": 5}, headers={"Idempotency-Key": key}).json()["key"]
"""

AWAITED = """
import uuid
from capsule import task
from capsule.http import get_async, post_async

@task(name="main", allowed_hosts=["127.0.0.1"])
async def main(url: str) -> str:
    await get_async(url)
    key = str(uuid.uuid4())
    response = await post_async(url, json={"amount": 5}, headers={"Idempotency-Key": key})
    return response.json()["key"]
"""


def test_a_blocking_request_in_flight_at_a_crash_is_sent_again_with_the_same_key(
    payments: PaymentServer, tmp_path: Path, core: str
) -> None:
    killed_in_flight_then_resumed(BLOCKING, "pay.py", payments, tmp_path, "--core", core)


def test_an_awaited_request_in_flight_at_a_crash_is_sent_again_with_the_same_key(
    payments: PaymentServer, tmp_path: Path, core: str
) -> None:
    killed_in_flight_then_resumed(AWAITED, "pay.py", payments, tmp_path, "--core", core)


#: A draw larger than the journal can take (see the test below), then a
#: request with a key from it: blocking, or awaited.
UNJOURNALED = {
    "blocking": """
import os
from capsule import task
from capsule.http import get, post

@task(name="main", allowed_hosts=["127.0.0.1"])
def main(base: str) -> int:
    get(base + "/status/204")
    key = os.urandom(600_000).hex()[:32]
    return post(base + "/echo", headers={"Idempotency-Key": key}).status_code
""",
    "awaited": """
import os
from capsule import task
from capsule.http import get_async, post_async

@task(name="main", allowed_hosts=["127.0.0.1"])
async def main(base: str) -> int:
    await get_async(base + "/status/204")
    key = os.urandom(600_000).hex()[:32]
    return (await post_async(base + "/echo", headers={"Idempotency-Key": key})).status_code
""",
}


@pytest.mark.parametrize("form", list(UNJOURNALED))
def test_a_request_whose_inputs_the_journal_cannot_keep_is_not_sent(
    tmp_path: Path, http_server: LocalServer, core: str, form: str
) -> None:
    """The file-size limit makes the journal's commit of the draw fail, as on
    a full disk: the run stops (exit 2), and the request never leaves."""
    program = tmp_path / "pay.py"
    program.write_text(UNJOURNALED[form])

    def limit_file_size() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, 400_000))

    done = subprocess.run(
        [sys.executable, "-m", "capsule.cli", "run", str(program), http_server.url, "--core", core],
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
        timeout=300,
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot be written" in done.stderr and "Traceback" not in done.stderr
    assert http_server.hits == {"/status/204": 1}
