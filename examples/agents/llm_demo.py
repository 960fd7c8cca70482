"""Run the researcher example against a local stand-in LLM API: starts the
stand-in on a free port, then `capsule run researcher.py` with its URL and the
API key granted through the environment.

    python examples/agents/llm_demo.py [--verbose]
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from llm_server import API_KEY, serve  # noqa: E402


def main() -> int:
    server = serve(0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    api = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        return subprocess.call(
            [sys.executable, "-m", "capsule.cli", "run", str(HERE / "researcher.py"), api,
             *sys.argv[1:]],
            env={**os.environ, "LLM_API_KEY": API_KEY},
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


if __name__ == "__main__":
    sys.exit(main())
