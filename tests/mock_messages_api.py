"""A mock of the Anthropic Messages API for the real Claude Code, served on 127.0.0.1 port 0.

Claude Code (2.1.x, with ANTHROPIC_BASE_URL pointing here and CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1)
calls only `POST /v1/messages?beta=true`, streaming (SSE). Turns are scripted by the newest user text:

- `BASH:<command>`  a Bash tool_use of that command (Claude opens a permission dialog for it);
  once the tool result comes back, a text reply "tool finished".
- `SLOW:<seconds> …`  a text reply streamed slowly over that many seconds (Claude stays working).
- anything else     a text reply `ok: <text>`.

A request without tools (the small model naming the session) gets a short title. Every request is
kept in `requests` (path and JSON body) for tests to read.
"""

import http.server
import json
import re
import threading
import time

BASH_RE = re.compile(r"BASH:(\S[^\n]*)")
SLOW_RE = re.compile(r"SLOW:(\d+(?:\.\d+)?)")


def _user_texts(body: dict) -> list[str]:
    """Return the text blocks of the newest user message, system reminders left out."""
    messages = [m for m in body.get("messages") or () if m.get("role") == "user"]
    if not messages:
        return []
    content = messages[-1].get("content")
    if isinstance(content, str):
        return [content]
    return [b.get("text", "") for b in content or () if isinstance(b, dict) and b.get("type") == "text"
            and not b.get("text", "").lstrip().startswith("<system-reminder>")]


def _prompt(body: dict) -> str:
    """Return what the user typed last: the newest text block that is not Claude's own note."""
    texts = [t for t in _user_texts(body) if not t.lstrip().startswith("[Request interrupted")]
    return texts[-1].strip() if texts else ""


def _has_tool_result(body: dict) -> bool:
    """Tell whether the newest user message carries a tool result and no prompt typed after it."""
    messages = [m for m in body.get("messages") or () if m.get("role") == "user"]
    content = messages[-1].get("content") if messages else None
    last = None
    for b in content if isinstance(content, list) else ():
        if not isinstance(b, dict):
            continue
        if b.get("type") == "tool_result":
            last = "result"
        elif b.get("type") == "text" and not b.get("text", "").lstrip().startswith(("<system-reminder>", "[Request")):
            last = "text"
    return last == "result"


class MockMessagesApi:
    """The mock server; `url` is its base URL, `requests` what it received."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.n_msg = 0
        self.lock = threading.Lock()
        api = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                with api.lock:
                    api.requests.append({"path": self.path, "body": body})
                    api.n_msg += 1
                    n = api.n_msg
                if not self.path.startswith("/v1/messages") or "count_tokens" in self.path:
                    self._send(404, b'{"type":"error","error":{"type":"not_found_error","message":"mock"}}')
                    return
                blocks, delay_s = api.script(body)
                if body.get("stream"):
                    self._stream(n, body, blocks, delay_s)
                else:
                    msg = api.message(n, body, blocks)
                    self._send(200, json.dumps(msg).encode())

            def do_GET(self) -> None:
                self._send(404, b"{}")

            def do_HEAD(self) -> None:
                self._send(404, b"")

            def _send(self, status: int, data: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, n: int, body: dict, blocks: list[dict], delay_s: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                msg = api.message(n, body, [])
                msg["usage"] = {"input_tokens": 10 + n, "output_tokens": 1, "cache_creation_input_tokens": 0,
                                "cache_read_input_tokens": 0}
                try:
                    self._event("message_start", {"type": "message_start", "message": msg})
                    for i, block in enumerate(blocks):
                        if block["type"] == "text":
                            self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                                "content_block": {"type": "text", "text": ""}})
                            words = block["text"].split(" ")
                            pause = delay_s / max(1, len(words))
                            for j, word in enumerate(words):
                                if pause:
                                    time.sleep(pause)
                                delta = {"type": "text_delta", "text": word + (" " if j < len(words) - 1 else "")}
                                self._event("content_block_delta",
                                            {"type": "content_block_delta", "index": i, "delta": delta})
                        else:
                            self._event("content_block_start", {"type": "content_block_start", "index": i,
                                                                "content_block": {**block, "input": {}}})
                            self._event("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                                "type": "input_json_delta", "partial_json": json.dumps(block["input"])}})
                        self._event("content_block_stop", {"type": "content_block_stop", "index": i})
                    stop = "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn"
                    self._event("message_delta", {"type": "message_delta",
                                                  "delta": {"stop_reason": stop, "stop_sequence": None},
                                                  "usage": {"output_tokens": 5 + n}})
                    self._event("message_stop", {"type": "message_stop"})
                except (BrokenPipeError, ConnectionResetError):  # Esc: Claude hung up mid-stream
                    pass

            def _event(self, name: str, data: dict) -> None:
                self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                self.wfile.flush()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def start(self) -> "MockMessagesApi":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def script(self, body: dict) -> tuple[list[dict], float]:
        """Return the reply's content blocks and how long to take streaming them."""
        if not body.get("tools"):
            return [{"type": "text", "text": '{"title": "Mock session"}'}], 0.0
        if _has_tool_result(body):
            return [{"type": "text", "text": "tool finished"}], 0.0
        text = _prompt(body)
        bash = BASH_RE.search(text)
        if bash:
            with self.lock:
                tool_id = f"toolu_mock_{self.n_msg:05d}"
            return [{"type": "tool_use", "id": tool_id, "name": "Bash",
                     "input": {"command": bash.group(1).strip(), "description": "mock command"}}], 0.0
        slow = SLOW_RE.search(text)
        words = " ".join(text.split())[:60]
        if slow:
            return [{"type": "text", "text": f"slow reply to {words} " + "word " * 20}], float(slow.group(1))
        return [{"type": "text", "text": f"ok: {words}"}], 0.0

    def message(self, n: int, body: dict, blocks: list[dict]) -> dict:
        return {"id": f"msg_mock_{n:05d}", "type": "message", "role": "assistant",
                "model": body.get("model") or "claude-mock", "content": blocks,
                "stop_reason": "tool_use" if any(b["type"] == "tool_use" for b in blocks) else "end_turn",
                "stop_sequence": None,
                "usage": {"input_tokens": 10 + n, "output_tokens": 5 + n, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0}}

    def prompts(self) -> list[str]:
        """Return the newest user text of every main-model request, in order."""
        return [_prompt(r["body"]) for r in self.requests
                if r["body"].get("tools") and not _has_tool_result(r["body"])]
