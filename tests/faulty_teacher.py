"""A loopback OpenAI-compatible teacher that misbehaves on purpose, for the distill client's tests.

It speaks just enough HTTP/1.1 (asyncio streams, `Connection: close`) to answer
/v1/chat/completions and /v1/completions, and injects, per request, one of:

  429         rate limited (with `Retry-After`), 500 / 503 server errors,
  slow        answers only after `slow_s` seconds (beyond the client's per-request timeout),
  drop        closes the connection without a response,
  truncate    sends the headers and half the body, then closes,
  empty       200 with no choices.

Faults are a deterministic function of the request (its prompt and seed) and of how many times
that request was seen: the first few attempts of a request fail with probability `fault_rate`
each, and a `permanent_rate` share of requests fail with 500 every time until `heal()`. A
successful answer is `expected_response(prompt, seed)`, with `REASONING` as a DeepSeek-style
`reasoning_content`, so tests can check every record they get.

    python tests/faulty_teacher.py --port 0 --fault-rate 0.3   # prints its URL
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import random
import threading
import time

FAULTS = ("429", "500", "503", "slow", "drop", "truncate", "empty", "malformed")
REASONING = "Let me think about this carefully."


def expected_response(prompt: str, seed) -> str:
    """What the teacher answers (when it answers) for a user prompt and a seed."""
    digest = hashlib.sha256(f"{prompt}|{seed}".encode()).hexdigest()[:12]
    return f"Answer {digest}: \\boxed{{{int(digest[:6], 16) % 1000}}}"


class FaultyTeacher:
    def __init__(self, *, fault_rate: float = 0.3, permanent_rate: float = 0.0, max_faults: int = 2,
                 faults: tuple[str, ...] = FAULTS, slow_s: float = 3.0, delay_s: float = 0.0,
                 model: str = "faulty-teacher", seed: int = 0):
        self.fault_rate, self.permanent_rate, self.max_faults = fault_rate, permanent_rate, max_faults
        self.faults, self.slow_s, self.delay_s, self.model, self.seed = faults, slow_s, delay_s, model, seed
        self.healed = False
        self.attempts: collections.Counter = collections.Counter()  # request key -> times seen
        self.injected: collections.Counter = collections.Counter()  # fault -> count
        self.answered = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self.url = ""

    # -- the plan ---------------------------------------------------------------------------------

    def plan(self, key: str) -> tuple[bool, list[str]]:
        """(fails permanently, faults for the first attempts) of a request key."""
        rng = random.Random(f"{self.seed}/{key}")
        permanent = rng.random() < self.permanent_rate
        faults = []
        for _ in range(self.max_faults):
            if rng.random() >= self.fault_rate:
                break
            faults.append(rng.choice(self.faults))
        return permanent, faults

    def _fault_for(self, key: str) -> str | None:
        with self._lock:
            attempt = self.attempts[key]
            self.attempts[key] += 1
            permanent, faults = self.plan(key)
            fault = "500" if permanent and not self.healed else (faults[attempt] if attempt < len(faults) else None)
            if fault:
                self.injected[fault] += 1
            return fault

    def heal(self) -> None:
        """Permanent failures stop (transient ones still follow their plan)."""
        self.healed = True

    # -- HTTP -------------------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, path, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
            length = int({k.lower(): v for k, v in headers.items()}.get("content-length", 0))
            body = json.loads(await reader.readexactly(length)) if length else {}
            await self._respond(method, path, body, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _respond(self, method: str, path: str, body: dict, writer: asyncio.StreamWriter) -> None:
        if method == "GET" and path.endswith("/models"):
            return await _send(writer, 200, {"object": "list", "data": [{"id": self.model, "object": "model"}]})
        chat = path.endswith("/chat/completions")
        if method != "POST" or not (chat or path.endswith("/completions")):
            return await _send(writer, 404, {"error": {"message": "not found", "type": "invalid_request_error"}})
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        seed = body.get("seed")
        fault = self._fault_for(f"{prompt}|{seed}")
        if fault == "drop":
            return
        if fault in ("429", "500", "503"):
            extra = {"Retry-After": "0.05"} if fault == "429" else {}
            return await _send(writer, int(fault), {"error": {"message": f"injected {fault}", "type": "server_error",
                                                              "param": None, "code": None}}, extra)
        await asyncio.sleep(self.slow_s if fault == "slow" else self.delay_s)
        text = expected_response(prompt, seed)
        if chat:
            choice = {"index": 0, "finish_reason": "stop",
                      "message": {"role": "assistant", "content": text, "reasoning_content": REASONING}}
        else:
            choice = {"index": 0, "finish_reason": "stop", "text": text}
        resp = {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model, "choices": [] if fault == "empty" else [choice],
                "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                          "total_tokens": len(prompt.split()) + len(text.split())}}
        if fault is None:
            with self._lock:
                self.answered += 1
        await _send(writer, 200, resp, truncate=fault == "truncate", malformed=fault == "malformed")

    # -- lifecycle --------------------------------------------------------------------------------

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self._port))
        self.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        self._ready.set()
        self._loop.run_forever()
        server.close()
        pending = asyncio.all_tasks(self._loop)  # slow answers still sleeping
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def start(self, port: int = 0) -> "FaultyTeacher":
        self._port = port
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> "FaultyTeacher":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _send(writer: asyncio.StreamWriter, status: int, body: dict, headers: dict | None = None,
                truncate: bool = False, malformed: bool = False) -> None:
    # malformed: a whole 200 body that is not JSON (a proxy's error page, say)
    data = b"<html>502 Bad Gateway</html>" if malformed else json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}", "Content-Type: application/json",
             f"Content-Length: {len(data)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (data[: len(data) // 2] if truncate else data))
    await writer.drain()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--fault-rate", type=float, default=0.3)
    p.add_argument("--permanent-rate", type=float, default=0.0)
    p.add_argument("--slow-s", type=float, default=3.0)
    p.add_argument("--delay-s", type=float, default=0.0)
    args = p.parse_args()
    teacher = FaultyTeacher(fault_rate=args.fault_rate, permanent_rate=args.permanent_rate,
                            slow_s=args.slow_s, delay_s=args.delay_s).start(args.port)
    print(f"faulty teacher at {teacher.url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        teacher.stop()


if __name__ == "__main__":
    main()
