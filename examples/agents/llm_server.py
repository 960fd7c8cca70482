"""A stand-in for an LLM chat-completions API, for the researcher example: it
answers deterministically and wants the API key the example grants.

    python examples/agents/llm_server.py          # serves http://127.0.0.1:8808
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

API_KEY = "demo-key"


class StandInLLM(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if self.path != "/v1/chat/completions":
            return self._reply(404, {"error": {"message": f"no such endpoint {self.path}"}})
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            return self._reply(401, {"error": {"message": "invalid API key"}})
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        prompt = request["messages"][-1]["content"]
        if prompt.startswith("Outline"):
            topic = prompt.split(" about ", 1)[-1]
            answer = "\n".join(
                f"- {aspect} of {topic}" for aspect in ("isolation", "durability", "fairness")
            )
        else:
            subject = prompt.removeprefix("Expand: ")
            answer = f"{subject.capitalize()}: each agent gets its own limits and journal."
        self._reply(
            200,
            {
                "model": request.get("model", "stand-in"),
                "choices": [{"message": {"role": "assistant", "content": answer}}],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": 12},
            },
        )

    def _reply(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: object) -> None:
        return None


def serve(port: int = 8808) -> ThreadingHTTPServer:
    return ThreadingHTTPServer(("127.0.0.1", port), StandInLLM)


if __name__ == "__main__":
    server = serve(int(sys.argv[1]) if len(sys.argv) > 1 else 8808)
    print(f"stand-in LLM API on http://127.0.0.1:{server.server_address[1]}", flush=True)
    server.serve_forever()
