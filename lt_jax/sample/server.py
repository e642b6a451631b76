"""An OpenAI-compatible HTTP server (aiohttp) over any batch-level backend.

Concurrent requests are *batched*: the `Batcher` waits up to `batch_window_ms` after the first
queued request (or until `max_batch_sequences` sequences are queued) and hands the lot to the
backend in one call, on one worker thread, so an accelerator sees batches rather than a stream
of single prompts. While one batch runs, the next one queues.

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions, POST /v1/completions
(streaming as server-sent events or not), plus GET /health and GET /stats (batch sizes) without
authentication. With an API key set, /v1/* needs `Authorization: Bearer <key>`. Every failure
is answered with an OpenAI-shaped error body; a backend exception fails only its batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hmac
import json
import logging
import queue
import socket
import threading
import time
from typing import Any, AsyncIterator

from aiohttp import web

from lt_jax.sample import openai_api as api
from lt_jax.sample.backends import Backend, GenRequest, StreamEvent, events_from_results

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port
    api_key: str | None = None
    max_batch_sequences: int = 64  # sum of n over the requests of one backend call
    batch_window_ms: float = 5.0
    max_queued_requests: int = 4096  # beyond this, 503 (clients retry) instead of unbounded memory
    max_n: int = 128
    reasoning_format: str = "inline"  # default for chat; a request may set "reasoning_format"
    max_body_bytes: int = 32 * 2**20

    def __post_init__(self):
        if self.reasoning_format not in api.REASONING_FORMATS:
            raise ValueError(f"reasoning_format must be one of {api.REASONING_FORMATS}")
        if self.max_batch_sequences < 1 or self.batch_window_ms < 0:
            raise ValueError("max_batch_sequences must be >= 1 and batch_window_ms >= 0")


# ---------------------------------------------------------------------------------------------
# Batching


@dataclasses.dataclass
class _Item:
    request: GenRequest
    tag: int  # which prompt of its HTTP call
    out: asyncio.Queue  # (tag, StreamEvent) or an Exception
    stream: bool


class Batcher:
    """Collects queued requests into backend calls and routes the backend's events back."""

    def __init__(self, backend: Backend, cfg: ServerConfig):
        self.backend, self.cfg = backend, cfg
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._carry: _Item | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lt-jax-backend")
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # sequences -> calls
        self.requests = 0

    def submit(self, requests: tuple[GenRequest, ...], stream: bool = False) -> asyncio.Queue:
        """Queues the requests of one HTTP call; their events arrive on the returned queue."""
        if self._queue.qsize() + len(requests) > self.cfg.max_queued_requests:
            raise api.APIError("server overloaded; retry later", status=503, type="server_error",
                               code="overloaded")
        out: asyncio.Queue = asyncio.Queue()
        for tag, request in enumerate(requests):
            self._queue.put_nowait(_Item(request, tag, out, stream))
        return out

    async def run_forever(self) -> None:
        while True:
            await self._run_batch(await self._next_batch())

    async def _next_batch(self) -> list[_Item]:
        first = self._carry or await self._queue.get()
        self._carry = None
        batch, size = [first], first.request.n
        deadline = asyncio.get_running_loop().time() + self.cfg.batch_window_ms / 1000
        while size < self.cfg.max_batch_sequences:
            try:
                timeout = deadline - asyncio.get_running_loop().time()
                item = self._queue.get_nowait() if self._queue.qsize() else await asyncio.wait_for(
                    self._queue.get(), max(timeout, 0))
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if size + item.request.n > self.cfg.max_batch_sequences:
                self._carry = item  # first of the next batch
                break
            batch.append(item)
            size += item.request.n
        return batch

    async def _run_batch(self, batch: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        self.batch_sizes[sum(it.request.n for it in batch)] += 1
        self.requests += len(batch)
        remaining = [it.request.n for it in batch]

        def work() -> None:  # on the backend thread
            requests = [it.request for it in batch]
            stream = getattr(self.backend, "generate_stream", None)
            if stream is not None and any(it.stream for it in batch):
                events = stream(requests)
            else:  # nobody streams (or cannot): one event per finished choice
                results = self.backend.generate(requests)
                if len(results) != len(requests):
                    raise RuntimeError(f"backend returned {len(results)} results for {len(requests)} requests")
                events = events_from_results(results, [it.stream for it in batch])
            for ev in events:
                item = batch[ev.request]
                if ev.finish_reason is not None:
                    remaining[ev.request] -= 1
                loop.call_soon_threadsafe(item.out.put_nowait, (item.tag, ev))

        try:
            await loop.run_in_executor(self._executor, work)
            error: Exception | None = None
        except Exception as e:  # a backend failure fails this batch only
            log.exception("backend failed on a batch of %d requests", len(batch))
            error = e
        for item, left in zip(batch, remaining):
            if left > 0:
                msg = f"backend error: {error}" if error else "backend returned no result for this request"
                item.out.put_nowait(api.APIError(msg, status=500, type="server_error", code="backend_error"))

    def stats(self) -> dict[str, Any]:
        calls = sum(self.batch_sizes.values())
        return {"backend_calls": calls, "requests": self.requests,
                "sequences": sum(k * v for k, v in self.batch_sizes.items()),
                "max_batch_sequences": max(self.batch_sizes, default=0),
                "batch_size_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())}}

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class _Call:
    """One HTTP call's prepared requests in the engine runner, and where their events go."""

    def __init__(self, prepared: list, out: asyncio.Queue):
        self.prepared, self.out = prepared, out
        self.rids: dict[int, int] = {}  # engine request id -> tag (which prompt of the call)
        self.left = [len(p.specs) for p in prepared]  # choices still running, per tag
        self.cancelled = False


class EngineRunner:
    """Continuous batching for an incremental backend (`model_backend.ModelBackend`): each request
    joins the running batch as soon as it arrives. One daemon thread owns the backend: it opens
    new requests, cancels those whose clients left, and runs engine steps, routing each step's
    text deltas to their HTTP calls. Same `submit` / `stats` / `close` shape as `Batcher`."""

    def __init__(self, backend: Any, cfg: ServerConfig):
        self.backend, self.cfg = backend, cfg
        self._inbox: "queue.Queue[tuple[str, _Call]]" = queue.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._calls: dict[int, _Call] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="lt-jax-engine")
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # running sequences -> steps
        self.requests = 0
        self.queued = 0

    async def run_forever(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()
        await asyncio.Event().wait()  # lives as long as the app; the thread does the work

    def submit(self, prepared: list, stream: bool = False) -> _Call:
        if self.queued + len(prepared) > self.cfg.max_queued_requests:
            raise api.APIError("server overloaded; retry later", status=503, type="server_error",
                               code="overloaded")
        call = _Call(prepared, asyncio.Queue())
        self.queued += len(prepared)
        self.requests += len(prepared)
        self._inbox.put(("open", call))
        return call

    def cancel(self, call: _Call) -> None:
        """The client left: its requests stop and free their slots and pages."""
        self._inbox.put(("cancel", call))

    def _send(self, call: _Call, item) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(call.out.put_nowait, item)

    def _main(self) -> None:
        # Several hosts: the other processes wait in `Engine.follow` for each step, so an idle engine
        # still steps (every 0.1 s: new requests reach them), and stopping the server releases them.
        lockstep = self.backend.engine.lockstep
        while not self._stop.is_set():
            try:
                self._take_messages(block=not self.backend.busy)
                if self.backend.busy or lockstep:
                    self._step()
            except Exception as e:  # a backend failure fails the requests in flight, not the server
                log.exception("engine step failed")
                for rid, call in list(self._calls.items()):
                    self._send(call, api.APIError(f"backend error: {e}", status=500, type="server_error",
                                                  code="backend_error"))
                    self.backend.cancel(rid)
                self._calls.clear()
        self.backend.engine.close()

    def _take_messages(self, block: bool) -> None:
        try:
            kind, call = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if kind == "open" and not call.cancelled:
                self.queued -= len(call.prepared)
                for tag, prepared in enumerate(call.prepared):
                    rid = self.backend.open(prepared)
                    call.rids[rid] = tag
                    self._calls[rid] = call
            elif kind == "cancel":
                call.cancelled = True
                for rid in list(call.rids):
                    self.backend.cancel(rid)
                    self._calls.pop(rid, None)
            try:
                kind, call = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        self.batch_sizes[sum(s is not None for s in self.backend.engine.slots)] += 1
        for rid, ev in self.backend.step():
            call = self._calls.get(rid)
            if call is None:
                continue
            tag = call.rids[rid]
            self._send(call, (tag, ev))
            if ev.finish_reason is not None:
                call.left[tag] -= 1
                if not call.left[tag]:  # every choice of this request has finished
                    del self._calls[rid]

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "engine_steps": sum(self.batch_sizes.values()),
                "running_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
                "engine": dict(self.backend.engine.stats)}

    def close(self) -> None:
        self._stop.set()
        if self.backend.engine.lockstep and self._thread.is_alive():
            self._thread.join(timeout=60)  # its last act releases the other hosts (Engine.close)


async def _events(out: asyncio.Queue, expected: int, watch: web.Request | None = None
                  ) -> AsyncIterator[tuple[int, StreamEvent]]:
    """Yields (tag, event) until `expected` choices have finished; raises a backend error. With
    `watch`, raises ConnectionResetError once that request's client has disconnected."""
    while expected:
        if watch is None:
            got = await out.get()
        else:
            try:
                got = await asyncio.wait_for(out.get(), 0.25)
            except asyncio.TimeoutError:
                if watch.transport is None or watch.transport.is_closing():
                    raise ConnectionResetError("the client disconnected") from None
                continue
        if isinstance(got, Exception):
            raise got
        if got[1].finish_reason is not None:
            expected -= 1
        yield got


# ---------------------------------------------------------------------------------------------
# HTTP handlers


class _Handlers:
    def __init__(self, backend: Backend, cfg: ServerConfig, batcher: Batcher):
        self.backend, self.cfg, self.batcher = backend, cfg, batcher
        self.created = int(time.time())

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(api.model_list(self.backend.name, self.created))

    async def model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.backend.name:
            raise api.APIError(f"model {request.match_info['model']!r} does not exist", param="model",
                               code="model_not_found", status=404)
        return web.json_response(api.model_card(self.backend.name, self.created))

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "model": self.backend.name})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.batcher.stats())

    async def chat(self, request: web.Request) -> web.StreamResponse:
        call = api.parse_chat(await _json_body(request), self.backend.name, max_n=self.cfg.max_n,
                              reasoning_format=self.cfg.reasoning_format)
        return await self._serve(request, call, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        call = api.parse_completion(await _json_body(request), self.backend.name, max_n=self.cfg.max_n)
        return await self._serve(request, call, chat=False)

    async def _serve(self, request: web.Request, call: api.ParsedCall, chat: bool) -> web.StreamResponse:
        if isinstance(self.batcher, EngineRunner):
            return await self._serve_engine(request, call, chat)
        validate = getattr(self.backend, "validate", None)  # backend-specific limits, e.g. context length
        for req in call.requests if validate else ():
            try:
                validate(req)
            except ValueError as e:
                raise api.APIError(str(e), code="invalid_request") from None
        out = self.batcher.submit(call.requests, call.stream)
        return await self._respond(request, call, chat, out)

    async def _serve_engine(self, request: web.Request, call: api.ParsedCall, chat: bool) -> web.StreamResponse:
        """Requests checked one by one (tokenized off the event loop), then straight into the
        running batch; a client that goes away cancels its requests."""
        loop = asyncio.get_running_loop()
        prepared = []
        for req in call.requests:
            try:
                prepared.append(await loop.run_in_executor(None, self.backend.prepare, req))
            except ValueError as e:
                raise api.APIError(str(e), code="invalid_request") from None
        handle = self.batcher.submit(prepared, call.stream)
        gone = lambda: self.batcher.cancel(handle)  # noqa: E731
        try:
            return await self._respond(request, call, chat, handle.out, gone)
        except BaseException:  # a failure or a cancelled handler: free the slots and pages
            gone()
            raise

    async def _respond(self, request: web.Request, call: api.ParsedCall, chat: bool, out,
                       gone=None) -> web.StreamResponse:
        """The answer to a call whose events arrive on `out`. gone: called when the client has left
        (the engine then stops its requests); without it a departure is an error as before."""
        n = call.requests[0].n
        expected = n * len(call.requests)
        call_id = api.new_id("chatcmpl" if chat else "cmpl")
        if call.stream:
            return await self._stream(request, call, out, expected, call_id, chat, gone)
        texts = [[] for _ in range(expected)]
        finish: list[str] = [""] * expected
        prompt_tokens, completion_tokens = [0] * len(call.requests), 0
        watch = request if gone is not None else None
        try:
            events = [x async for x in _events(out, expected, watch)]
        except ConnectionResetError:
            gone()
            log.info("client left before its answer; its requests are cancelled")
            return web.Response(status=499)
        logprobs: list = [None] * expected
        for tag, ev in events:
            index = tag * n + ev.choice
            texts[index].append(ev.text)
            if ev.finish_reason is not None:
                finish[index] = ev.finish_reason
                prompt_tokens[tag] = ev.prompt_tokens
                completion_tokens += ev.completion_tokens
            if ev.logprobs is not None:  # each event carries its tokens' entries
                logprobs[index] = (logprobs[index] or ()) + tuple(ev.logprobs)
        choices = [("".join(t), f) for t, f in zip(texts, finish)]
        use = api.usage(sum(prompt_tokens), completion_tokens)
        body = (api.chat_response(call_id, call.model, choices, call.reasoning_format, use, logprobs) if chat
                else api.completion_response(call_id, call.model, choices, use, logprobs))
        return web.json_response(body)

    async def _stream(self, request, call, out, expected, call_id, chat, gone=None) -> web.StreamResponse:
        n = call.requests[0].n
        separate = chat and call.reasoning_format == "separate"
        splitters = [api.ThinkSplitter() if separate else None for _ in range(expected)]
        events = _events(out, expected, request if gone is not None else None)
        # Wait for the first event before sending headers, so a backend error is still an HTTP 500.
        first = await anext(events)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        send = lambda body: response.write(b"data: " + json.dumps(body).encode() + b"\n\n")  # noqa: E731
        if chat:
            for i in range(expected):
                await send(api.chat_chunk(call_id, call.model, i, {"role": "assistant", "content": ""}))
        prompt_tokens, completion_tokens = [0] * len(call.requests), 0
        offsets = [0] * expected  # completions: text offset of each choice's next logprob entry
        try:
            async for tag, ev in _chain(first, events):
                index = tag * n + ev.choice
                for body in self._chunks(call_id, call.model, index, ev, splitters[index], chat, offsets[index]):
                    await send(body)
                offsets[index] += sum(len(t) for t, _, _ in ev.logprobs or ())
                if ev.finish_reason is not None:
                    prompt_tokens[tag] = ev.prompt_tokens
                    completion_tokens += ev.completion_tokens
        except api.APIError as e:  # headers are sent: report in-band, as OpenAI does
            await send(e.body())
        except ConnectionResetError:
            if gone is None:
                raise
            gone()
            log.info("a streaming client left; its requests are cancelled")
            return response
        else:
            if call.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                await send(api.usage_chunk(call_id, call.model, obj, api.usage(sum(prompt_tokens), completion_tokens)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    @staticmethod
    def _chunks(call_id, model, index, ev: StreamEvent, splitter, chat, offset: int = 0) -> list[dict]:
        """The SSE bodies of one event; its tokens' logprobs ride on its first chunk."""
        if not chat:
            return [api.completion_chunk(call_id, model, index, ev.text, ev.finish_reason, ev.logprobs, offset)]
        if splitter is None:
            deltas = [{"content": ev.text}] if ev.text else []
        else:
            reasoning, content = splitter.feed(ev.text)
            if ev.finish_reason is not None:
                r2, c2 = splitter.flush()
                reasoning, content = reasoning + r2, content + c2
            deltas = ([{"reasoning_content": reasoning}] if reasoning else []) + (
                [{"content": content}] if content else [])
        if ev.logprobs and not deltas:  # tokens whose text is held back (a partial character)
            deltas = [{"content": ""}]
        chunks = [api.chat_chunk(call_id, model, index, d, logprobs=ev.logprobs if k == 0 else None)
                  for k, d in enumerate(deltas)]
        if ev.finish_reason is not None:
            chunks.append(api.chat_chunk(call_id, model, index, {}, ev.finish_reason))
        return chunks


async def _chain(first, rest: AsyncIterator) -> AsyncIterator:
    yield first
    async for x in rest:
        yield x


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise api.APIError(f"invalid JSON body: {e}", code="invalid_json") from None


def _error_middleware(cfg: ServerConfig):
    @web.middleware
    async def middleware(request: web.Request, handler):
        try:
            if cfg.api_key and request.path.startswith("/v1/"):
                _check_key(request, cfg.api_key)
            return await handler(request)
        except api.APIError as e:
            return web.json_response(e.body(), status=e.status)
        except web.HTTPException as e:  # 404 route, 405 method, 413 body too large ...
            if e.status < 400:
                raise
            err = api.APIError(e.reason or str(e), status=e.status, code=str(e.status).lower())
            return web.json_response(err.body(), status=e.status)
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client went away; nothing to answer
        except Exception as e:  # never let one request take the server down
            log.exception("unhandled error on %s %s", request.method, request.path)
            err = api.APIError(f"internal error: {type(e).__name__}: {e}", status=500, type="server_error")
            return web.json_response(err.body(), status=500)

    return middleware


def _check_key(request: web.Request, key: str) -> None:
    given = request.headers.get("Authorization", "")
    token = given[7:] if given.startswith("Bearer ") else ""
    if not hmac.compare_digest(token.encode(), key.encode()):
        raise api.APIError("invalid or missing API key (send 'Authorization: Bearer <key>')",
                           type="invalid_request_error", code="invalid_api_key", status=401)


def make_app(backend: Backend, cfg: ServerConfig) -> web.Application:
    """The aiohttp application; the batcher starts and stops with it."""
    app = web.Application(middlewares=[_error_middleware(cfg)], client_max_size=cfg.max_body_bytes)
    # A backend that can take requests one by one runs continuously; others get batches.
    incremental = hasattr(backend, "prepare") and hasattr(backend, "step")
    batcher = EngineRunner(backend, cfg) if incremental else Batcher(backend, cfg)
    h = _Handlers(backend, cfg, batcher)
    app.router.add_get("/v1/models", h.models)
    app.router.add_get("/v1/models/{model}", h.model)
    app.router.add_post("/v1/chat/completions", h.chat)
    app.router.add_post("/v1/completions", h.completions)
    app.router.add_get("/health", h.health)
    app.router.add_get("/stats", h.stats)

    async def lifecycle(app):
        task = asyncio.create_task(batcher.run_forever())
        yield
        task.cancel()
        batcher.close()

    app.cleanup_ctx.append(lifecycle)
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one; read it back from getsockname())."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve(backend: Backend, cfg: ServerConfig, sock: socket.socket, stop: asyncio.Event) -> None:
    """Serves on `sock` until `stop` is set."""
    runner = web.AppRunner(make_app(backend, cfg), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, shutdown_timeout=1.0).start()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


class ServerThread:
    """A server on its own event loop in a daemon thread: for tests, benchmarks and notebooks.

    >>> with ServerThread(backend, ServerConfig(port=0)) as srv:
    ...     OpenAI(base_url=srv.url, api_key="-")
    """

    def __init__(self, backend: Backend, cfg: ServerConfig = ServerConfig(port=0)):
        self.backend, self.cfg = backend, cfg
        self.sock = bind(cfg.host, cfg.port)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}/v1"
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="lt-jax-server")

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(serve(self.backend, self.cfg, self.sock, self._stop))

    def start(self) -> "ServerThread":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
