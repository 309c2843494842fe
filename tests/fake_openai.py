"""An OpenAI-compatible chat-completions server on 127.0.0.1 for tests.

It speaks the real wire format (HTTP/1.1, chunked server-sent events), so the
real ``openai`` client talks to it through ``base_url``. Each request is
answered by the next queued ``Reply``, which can also misbehave the ways real
providers do: error statuses, an error object inside a 200 stream, a dropped
connection, a stream that hangs or ends without a finish reason.

Run it alone for manual testing: ``python tests/fake_openai.py --port 8765``.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Reply:
    """What the server does for one request."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " test server."])
    delay_s: float = 0.0  # pause before each piece
    status: int = 200
    error_body: dict | None = None  # JSON body for a non-200 status
    headers: dict[str, str] = field(default_factory=dict)
    finish_reason: str | None = "stop"  # None: the stream ends without one
    usage: bool = True  # a last chunk with `choices: []` and usage figures
    empty_deltas: bool = True  # a role-only first chunk and a content=None chunk
    error_event: dict | None = None  # `data: {"error": ...}` after the pieces, in a 200 stream
    raw_lines: list[str] = field(default_factory=list)  # sent as-is after the pieces
    drop: bool = False  # close the connection after the pieces, mid-body
    hang: bool = False  # stop sending after the pieces and wait
    keepalive: bool = False  # after the pieces, send only SSE comments (": ping") every 0.2 s
    echo: int = 0  # if set, the pieces are the words of the last message, this many times
    tagged: int = 0  # if set, this many words "<tag>w<i>", in sentences of 12, tag = the prompt's last word
    hold: threading.Event | None = None  # after the first piece, wait until the test sets it
    reasoning: list[str] = field(default_factory=list)  # streamed as reasoning deltas before the pieces
    reasoning_field: str = "reasoning_content"  # or "reasoning" (OpenRouter, Ollama)
    think_s: float = 0.0  # silence before the first piece, after the reasoning (if any)
    usage_figures: dict | None = None  # the usage object to send, instead of counting the pieces


@dataclass
class Sent:
    """What the server did for one request: for asserting on early closes."""

    pieces_sent: int = 0
    text: str = ""  # the text of the pieces sent
    stamps: list[tuple[float, int]] = field(default_factory=list)  # (time.time(), pieces sent) per piece
    aborted: bool = False  # the client went away before the end
    done: threading.Event = field(default_factory=threading.Event)


# How servers refuse a request field they do not take (HTTP 400), by field.
REFUSALS = {
    # OpenAI's reasoning models (o-series, gpt-5), on OpenAI and Azure.
    "max_tokens": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                              "Use 'max_completion_tokens' instead.",
                   "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"},
    # Older API versions and some OpenAI-compatible servers.
    "stream_options": {"message": "Unrecognized request argument supplied: stream_options",
                       "type": "invalid_request_error", "param": None, "code": None},
    "max_completion_tokens": {"message": "Unrecognized request argument supplied: max_completion_tokens",
                              "type": "invalid_request_error", "param": None, "code": None},
}


class FakeOpenAI:
    """A local chat-completions server; use as a context manager or call close().

    ``refuse`` names request fields it refuses with HTTP 400 the way real
    servers do (see REFUSALS), before taking a queued reply.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, default: Reply | None = None,
                 refuse: tuple[str, ...] = ()):
        self.refuse = set(refuse)
        self.refused: list[str] = []  # the fields refused, one per refused request
        self.queue: deque[Reply] = deque()
        self.default = default or Reply()
        self.requests: list[dict] = []  # {"headers": ..., "body": ...} per request
        self.sent: list[Sent] = []
        self.stopping = threading.Event()
        self.in_flight = 0  # requests being answered now
        self.max_in_flight = 0  # the most at any one time
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self.queue.extend(replies)

    def next_reply(self, body: dict, headers: dict) -> tuple[Reply, Sent]:
        with self._lock:
            self.requests.append({"headers": headers, "body": body, "at": time.time()})
            reply = self.queue.popleft() if self.queue else self.default
            sent = Sent()
            self.sent.append(sent)
        return reply, sent

    def close(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeOpenAI:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _chunk(delta: dict, finish_reason: str | None = None) -> dict:
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }


def _handler_for(server: FakeOpenAI) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            refused = next((name for name in sorted(server.refuse) if name in body), None)
            if refused is not None:
                with server._lock:
                    server.requests.append({"headers": dict(self.headers), "body": body, "at": time.time()})
                    server.refused.append(refused)
                return self._send_error(Reply(status=400, error_body={"error": REFUSALS[refused]}))
            reply, sent = server.next_reply(body, {k.lower(): v for k, v in self.headers.items()})
            with server._lock:
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
            try:
                if reply.status != 200:
                    self._send_error(reply)
                else:
                    self._stream(reply, sent, body)
            except (BrokenPipeError, ConnectionResetError):
                sent.aborted = True
            finally:
                with server._lock:
                    server.in_flight -= 1
                sent.done.set()

        def _send_error(self, reply: Reply) -> None:
            payload = json.dumps(
                reply.error_body
                or {"error": {"message": f"status {reply.status}", "type": "test_error"}}
            ).encode()
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def _stream(self, reply: Reply, sent: Sent, body: dict) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            pieces = reply.pieces
            if reply.echo:
                words = (body["messages"][-1]["content"] + " ") * reply.echo
                pieces = [word + " " for word in words.split()]
            if reply.tagged:
                tag = body["messages"][-1]["content"].split()[-1]
                pieces = [f"{tag}w{i}{'.' if i % 12 == 11 else ''} " for i in range(reply.tagged)]
            if reply.empty_deltas:
                self._event(_chunk({"role": "assistant", "content": ""}))
                self._event(_chunk({"content": None}))
            for thought in reply.reasoning:
                if reply.delay_s and server.stopping.wait(reply.delay_s):
                    return
                self._event(_chunk({"content": None, reply.reasoning_field: thought}))
            if reply.think_s and not self._quiet_for(reply.think_s, sent):
                return
            for piece in pieces:
                if reply.delay_s and server.stopping.wait(reply.delay_s):
                    return
                self._event(_chunk({"content": piece}))
                sent.pieces_sent += 1
                sent.text += piece
                sent.stamps.append((time.time(), sent.pieces_sent))
                if reply.hold is not None and sent.pieces_sent == 1:
                    reply.hold.wait(60)
            for line in reply.raw_lines:
                self._write(line.encode() + b"\n\n")
            if reply.error_event is not None:
                self._event({"error": reply.error_event})
            if reply.drop:
                self.wfile.flush()
                self.connection.shutdown(2)  # mid-body: the chunked encoding never ends
                self.close_connection = True
                return
            if reply.hang:
                server.stopping.wait(60)
                return
            if reply.keepalive:
                while not server.stopping.wait(0.2):
                    self._write(b": ping\n\n")
                return
            if reply.finish_reason is not None:
                self._event(_chunk({}, reply.finish_reason))
            if reply.usage:
                figures = reply.usage_figures or {"prompt_tokens": 10, "completion_tokens": len(pieces),
                                                  "total_tokens": 10 + len(pieces)}
                self._event({**_chunk({}), "choices": [], "usage": figures})
            self._write(b"data: [DONE]\n\n")
            self._write(b"")  # the last chunk of the chunked encoding

        def _quiet_for(self, seconds: float, sent: Sent) -> bool:
            """Send nothing for ``seconds``; False if the client went away (or the server stops) meanwhile."""
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                if server.stopping.wait(0.05):
                    return False
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable and not self.connection.recv(1, socket.MSG_PEEK):
                    sent.aborted = True  # closed by the client
                    return False
            return True

        def _event(self, data: dict) -> None:
            self._write(b"data: " + json.dumps(data).encode() + b"\n\n")

        def _write(self, data: bytes) -> None:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--tokens-per-s", type=float, default=40.0)
    args = parser.parse_args()
    words = (
        "This reply comes from the local test server. It streams one word at a time. "
        "Each sentence ends with a full stop, so the store writes it once. That is all."
    ).split(" ")
    pieces = [words[0]] + [" " + word for word in words[1:]]
    server = FakeOpenAI(port=args.port, default=Reply(pieces=pieces, delay_s=1 / args.tokens_per_s))
    print(f"OPENAI_BASE_URL={server.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
