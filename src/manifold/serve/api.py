"""The OpenAI-compatible HTTP surface: `GET /v1/models`, `POST /v1/completions`,
`POST /v1/chat/completions` (with `stream: true` as server-sent events), and `GET /health`.

Request fields: `max_tokens` (chat: also `max_completion_tokens`; absent: up to the context),
`temperature` in [0, 2] (0: greedy), `top_p` in (0, 1], `n`, `stop` (a string or up to 4), `seed`
(absent: a random one), `logprobs` (completions: top-N per token, with `echo` the prompt's too;
chat: `logprobs` and `top_logprobs`), `stream` and `stream_options.include_usage`, and vLLM's
`ignore_eos` (decode to max_tokens, for benchmarks); other fields are ignored. A bad request
(malformed JSON, a field of the wrong type or range, a prompt that does not fit the context, an
unknown model) is HTTP 400 with an OpenAI error body naming the field; a full queue is 429 and a
server shutting down 503. A prompt is text or token ids; in text, `<|endoftext|>` is the
document separator's id, as in training data (and as Hugging Face tokenizers read it).

vLLM's tokenizer endpoints, which lm-eval's `local-completions` model finds by itself and then
sends token ids: `GET /tokenizer_info`, `POST /tokenize` ({"prompt": text} -> {"tokens": ids,
"count", "max_model_len"}), `POST /detokenize` ({"tokens": ids} -> {"prompt": text}).

Chat template, for models trained without one (every model here): each message becomes
"<Role>: <content>" followed by a blank line ("System", "User", "Assistant"), and the prompt ends
with "Assistant:"; generation also stops at "\\nUser:".

Choice j of a request draws with `jax.random.split(jax.random.key(seed), n)[j]`, as `manifold
generate --seed` draws its one sample, so a request and the CLI give the same text.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from typing import Any, Callable, Literal

import jax
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from manifold.data.tokenizer import EOS
from manifold.serve.batcher import Batcher, Closed, Event, Job, QueueFull, Token

CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHAT_STOP = "\nUser:"
MAX_STOPS = 4


class BadRequest(ValueError):
  def __init__(self, param: str, message: str, status: int = 400, code: str | None = None):
    super().__init__(message)
    self.param, self.status, self.code = param, status, code


class _Body(BaseModel):
  model_config = ConfigDict(extra="ignore")

  model: str
  temperature: float = Field(1.0, ge=0, le=2)
  top_p: float = Field(1.0, gt=0, le=1)
  n: int = Field(1, ge=1)
  stream: bool = False
  stop: str | list[str] | None = None
  seed: int | None = Field(None, ge=-(2**63), lt=2**63)
  stream_options: dict[str, Any] | None = None
  ignore_eos: bool = False  # not OpenAI's (vLLM's name): decode past end-of-text, for fixed-length benchmarks


class CompletionBody(_Body):
  prompt: str | list[str] | list[int] | list[list[int]]
  max_tokens: int | None = Field(16, ge=0)
  logprobs: int | None = Field(None, ge=0, le=20)
  echo: bool = False


class TokenizeBody(BaseModel):
  model_config = ConfigDict(extra="ignore")

  prompt: str
  add_special_tokens: bool = False  # no tokenizer here adds any: accepted and ignored


class DetokenizeBody(BaseModel):
  model_config = ConfigDict(extra="ignore")

  tokens: list[int]


class Message(BaseModel):
  model_config = ConfigDict(extra="ignore")

  role: Literal["system", "user", "assistant"]
  content: str | list[dict[str, Any]]


class ChatBody(_Body):
  messages: list[Message] = Field(min_length=1)
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)
  logprobs: bool = False
  top_logprobs: int | None = Field(None, ge=0, le=20)


def chat_prompt(messages: list[Message]) -> str:
  """The plain chat template (see the module doc)."""
  parts = []
  for m in messages:
    content = m.content
    if not isinstance(content, str):
      if any(part.get("type") != "text" for part in content):
        raise BadRequest("messages", "messages: only text content parts are supported")
      content = "".join(str(part.get("text", "")) for part in content)
    parts.append(f"{CHAT_ROLES[m.role]}: {content}\n\n")
  return "".join(parts) + "Assistant:"


def encode_text(tokenizer, text: str) -> list[int]:
  """Token ids of `text`, each `<|endoftext|>` in it read as the separator's id."""
  pieces = [tokenizer.encode(piece).tolist() for piece in text.split(EOS)]
  return [t for i, piece in enumerate(pieces) for t in ([tokenizer.eos_id] if i else []) + piece]


class _Choice:
  """One completion's events, gathered for a response (or relayed as they come)."""

  def __init__(self):
    self.text, self.tokens, self.finish, self.prompt, self.error = "", [], None, None, None

  def add(self, event: Event) -> None:
    self.text += event.text
    self.tokens += event.tokens
    self.prompt = self.prompt if event.prompt is None else event.prompt
    self.finish, self.error = event.finish or self.finish, event.error or self.error


def make_app(
  batcher: Batcher,
  tokenizer,
  *,
  model_name: str,
  max_len: int,
  max_n: int,
  api_key: str | None = None,
  cors_origins: tuple[str, ...] = (),
  info: dict[str, Any] | None = None,
) -> FastAPI:
  """The FastAPI app serving `batcher`'s model as `model_name` (`info`: more for `GET /health`)."""
  app = FastAPI(title="manifold serve", docs_url=None, redoc_url=None, openapi_url=None)
  created = int(time.time())
  if cors_origins:
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"], allow_headers=["*"])

  def error(status: int, message: str, param: str | None, code: str | None = None, kind: str = "invalid_request_error"):
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)

  @app.exception_handler(RequestValidationError)
  async def invalid(_request, exc: RequestValidationError):
    first = exc.errors()[0]
    where = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = where[0] if where else None
    message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid')}"
    return error(400, message, param)

  @app.exception_handler(BadRequest)
  async def bad(_request, exc: BadRequest):
    return error(exc.status, str(exc), exc.param, exc.code)

  @app.middleware("http")
  async def authorize(request: Request, call_next):
    if api_key is not None and request.url.path != "/health":
      given = request.headers.get("authorization", "")
      if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
        return error(401, "a valid API key is required: Authorization: Bearer <key>", None, "invalid_api_key")
    return await call_next(request)

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "rows_busy": batcher.busy_rows,
            "waiting": len(batcher.waiting), **batcher.stats, **(info or {})}  # fmt: skip

  def checked_ids(ids: list[int], field: str) -> list[int]:
    bad = [t for t in ids if not 0 <= t < tokenizer.vocab_size]
    if bad:
      raise BadRequest(field, f"{field}: token id {bad[0]} outside [0, {tokenizer.vocab_size})")
    return ids

  @app.get("/tokenizer_info")
  async def tokenizer_info():
    return {"tokenizer_class": type(tokenizer).__name__, "eos_token": EOS, "bos_token": None, "pad_token": None,
            "vocab_size": tokenizer.vocab_size, "model_max_length": max_len}  # fmt: skip

  @app.post("/tokenize")
  async def tokenize(body: TokenizeBody):
    ids = encode_text(tokenizer, body.prompt)
    return {"tokens": ids, "count": len(ids), "max_model_len": max_len}

  @app.post("/detokenize")
  async def detokenize(body: DetokenizeBody):
    return {"prompt": tokenizer.decode(checked_ids(body.tokens, "tokens"))}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "local",
                                          "max_model_len": max_len}]}  # fmt: skip

  def check_common(body: _Body) -> tuple[str, ...]:
    if body.model != model_name:
      raise BadRequest("model", f"model: {body.model!r} is not served here; this server serves {model_name!r}",
                       code="model_not_found")  # fmt: skip
    if body.n > max_n:
      raise BadRequest("n", f"n={body.n}: at most {max_n} completions per request (--slots)")
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if len(stops) > MAX_STOPS or any(not s for s in stops):
      raise BadRequest("stop", f"stop: up to {MAX_STOPS} non-empty strings")
    return stops

  def jobs_for(
    prompts: list[list[int]], body: _Body, max_tokens: int | None, stops, field: str, scores_prompt: bool = False
  ) -> list[Job]:
    seed = body.seed if body.seed is not None else secrets.randbits(63)
    keys = jax.random.split(jax.random.key(seed), body.n)
    jobs = []
    for ids in prompts:
      if not ids:
        raise BadRequest(field, f"{field}: empty; give at least one token")
      if len(ids) >= max_len:
        raise BadRequest(field, f"{field}: {len(ids)} tokens, the model's context is {max_len}; shorten it",
                         code="context_length_exceeded")  # fmt: skip
      limit = max_len - len(ids) if max_tokens is None else max_tokens
      if len(ids) + limit > max_len:
        param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
        raise BadRequest(param, f"{param}={limit}: the prompt's {len(ids)} tokens + {limit} exceed the model's "
                                f"context of {max_len}; ask for at most {max_len - len(ids)}",
                         code="context_length_exceeded")  # fmt: skip
      for j in range(body.n):
        job = Job(
          ids,
          limit,
          body.temperature,
          body.top_p,
          keys[j],
          stops,
          sink=None,
          ignore_eos=body.ignore_eos,
          scores_prompt=scores_prompt,
        )
        jobs.append(job)
    return jobs

  async def run(jobs: list[Job]):
    """Submits `jobs`; yields (choice index, event) as they come."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    for i, job in enumerate(jobs):
      job.sink = lambda event, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, event))
    try:
      batcher.submit(jobs)
    except QueueFull as e:
      raise BadRequest("", f"the server is busy: {e}; retry later", status=429, code="rate_limit_exceeded") from None
    except Closed as e:
      raise BadRequest("", str(e), status=503) from None
    return queue

  async def relay(jobs: list[Job], queue: asyncio.Queue):
    """(choice index, event) until every job has finished; the events that arrived together are
    merged per choice (one chunk each, however far the decoder ran ahead of this loop); each is
    `taken` once the consumer asks for the next, which lets its row decode further."""
    left = len(jobs)
    try:
      while left:
        arrived = [await queue.get()]
        while not queue.empty():
          arrived.append(queue.get_nowait())
        merged: dict[int, Event] = {}
        for i, event in arrived:
          merged[i] = event if i not in merged else merged[i].then(event)
        for i, event in merged.items():
          left -= bool(event.finish or event.error)
          yield i, event
          batcher.taken(jobs[i], len(event.tokens))
    finally:  # however it ends (done, failed, its task cancelled), unfinished jobs free their rows
      batcher.cancel(jobs)

  def token_text(token_id: int) -> str:
    return tokenizer.decode([token_id])

  def usage(prompts: list[list[int]], choices: list[_Choice]) -> dict:
    prompt = sum(map(len, prompts))
    done = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}

  def completion_logprobs(tokens: list[Token], top: int, offset: int, prompt=None, ids=()) -> dict:
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(token_id: int, logprob, alternatives):
      nonlocal offset
      text = token_text(token_id)
      out["tokens"].append(text)
      out["token_logprobs"].append(logprob)
      out["top_logprobs"].append(None if alternatives is None else {token_text(a): b for a, b in alternatives[:top]})
      out["text_offset"].append(offset)
      offset += len(text)

    if prompt is not None:
      for t, token_id in enumerate(ids):
        alternatives = None if t == 0 else list(zip(map(int, prompt.prompt_top_ids[t]),
                                                    map(float, prompt.prompt_top_logprobs[t])))  # fmt: skip
        add(token_id, None if t == 0 else float(prompt.prompt_logprobs[t]), alternatives)
    for tok in tokens:
      add(tok.id, tok.logprob, tok.top(top))
    return out

  def chat_logprobs(tokens: list[Token], top: int) -> dict:
    def item(token_id, logprob):
      text = token_text(token_id)
      return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(t.id, t.logprob), "top_logprobs": [item(a, b) for a, b in t.top(top)]}
                        for t in tokens]}  # fmt: skip

  def failed(choices: list[_Choice]):
    why = next((c.error for c in choices if c.error), None)
    return None if why is None else error(500, f"decoding failed: {why}", None, kind="server_error")

  async def respond(body: _Body, jobs: list[Job], ids: list[list[int]], *, kind: str, chunk, final, opening=()):
    """The answer to a request whose `jobs` are queued: with `body.stream`, server-sent events
    (`opening` chunks, then `chunk(i, event, first)` per event unless None, the usage if asked,
    [DONE]); else one body of `final(i, choice)` per choice and the usage."""
    queue = await run(jobs)
    chat = kind == "chat.completion"
    rid, choices = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", [_Choice() for _ in jobs]
    streamed = f"{kind}.chunk" if chat else kind  # the object of a stream's chunks, as OpenAI names it

    def frame(obj: str, entries: list) -> dict:
      return {"id": rid, "object": obj, "created": int(time.time()), "model": model_name, "choices": entries}

    if not body.stream:
      async for i, event in relay(jobs, queue):
        choices[i].add(event)
      if (response := failed(choices)) is not None:
        return response
      return {**frame(kind, [final(i, c) for i, c in enumerate(choices)]), "usage": usage(ids, choices)}

    async def events():
      for entry in opening:
        yield _sse(frame(streamed, [entry]))
      sent = set()
      async for i, event in relay(jobs, queue):
        choices[i].add(event)
        if event.error:
          yield _sse({"error": {"message": f"decoding failed: {event.error}", "type": "server_error"}})
          return
        entry = chunk(i, event, i not in sent)
        if entry is not None:
          sent.add(i)
          yield _sse(frame(streamed, [entry]))
      if (body.stream_options or {}).get("include_usage"):
        yield _sse({**frame(streamed, []), "usage": usage(ids, choices)})
      yield "data: [DONE]\n\n"

    return EventStream(events(), on_end=lambda: batcher.cancel(jobs))

  @app.post("/v1/completions")
  async def completions(body: CompletionBody):
    stops = check_common(body)
    p = body.prompt
    if isinstance(p, str):
      prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
      prompts = [list(p)]
    else:
      prompts = list(p)
    ids = [encode_text(tokenizer, x) if isinstance(x, str) else checked_ids(list(x), "prompt") for x in prompts]
    texts = [x if isinstance(x, str) else tokenizer.decode(x) for x in prompts]
    scores_prompt = body.echo and body.logprobs is not None
    jobs = jobs_for(ids, body, body.max_tokens, stops, "prompt", scores_prompt=scores_prompt)
    n, top = body.n, body.logprobs or 0

    def choice(i: int, text: str, tokens: list[Token], finish, prompt, first: bool) -> dict:
      echoed = body.echo and first
      logprobs = None
      if body.logprobs is not None:
        logprobs = completion_logprobs(tokens, top, 0, prompt if echoed else None, ids[i // n] if echoed else ())
      return {"text": (texts[i // n] if echoed else "") + text, "index": i, "logprobs": logprobs,
              "finish_reason": finish}  # fmt: skip

    def chunk(i: int, event: Event, first: bool):
      if not (event.text or event.finish or body.logprobs is not None or (body.echo and first)):
        return None  # text held back (a stop string may be starting): nothing to send yet
      return choice(i, event.text, event.tokens, event.finish, event.prompt, first)

    def final(i: int, c: _Choice) -> dict:
      return choice(i, c.text, c.tokens, c.finish, c.prompt, True)

    return await respond(body, jobs, ids, kind="text_completion", chunk=chunk, final=final)

  @app.post("/v1/chat/completions")
  async def chat(body: ChatBody):
    stops = check_common(body) + (CHAT_STOP,)
    ids = [encode_text(tokenizer, chat_prompt(body.messages))]
    jobs = jobs_for(ids, body, body.max_completion_tokens or body.max_tokens, stops, "messages")
    top = body.top_logprobs or 0

    def chunk(i: int, event: Event, first: bool):
      if not (event.text or event.finish or body.logprobs):
        return None  # text held back (a stop string may be starting): nothing to send yet
      logprobs = chat_logprobs(event.tokens, top) if body.logprobs else None
      delta = {"content": event.text} if event.text else {}
      return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": event.finish}

    def final(i: int, c: _Choice) -> dict:
      return {"index": i, "message": {"role": "assistant", "content": c.text},
              "logprobs": chat_logprobs(c.tokens, top) if body.logprobs else None, "finish_reason": c.finish}  # fmt: skip

    opening = [
      {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(len(jobs))
    ]
    return await respond(body, jobs, ids, kind="chat.completion", chunk=chunk, final=final, opening=opening)

  return app


class EventStream(StreamingResponse):
  """Server-sent events that call `on_end` however the response ends: sent in full, failed, or its
  client gone (then the body's generator is abandoned mid-yield, and a `finally` inside it would
  wait for the garbage collector)."""

  def __init__(self, events, *, on_end: Callable[[], None]):
    super().__init__(events, media_type="text/event-stream")
    self.on_end = on_end

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      self.on_end()


def _sse(payload: dict) -> str:
  return f"data: {json.dumps(payload)}\n\n"
