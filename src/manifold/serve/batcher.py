"""The server's scheduler: a bounded queue of jobs and one thread that admits them into free rows of
a `SlotDecoder` and steps every admitted job together (continuous batching).

A job is one completion: a prompt's token ids, its limits and sampling settings, and a sink that
the thread calls with `Event`s (the text decoded so far, cut at a stop string, and the tokens
behind it). Between two steps the thread drops cancelled jobs (a client that went away), admits
queued ones into the free rows, then steps every row whose consumer keeps up: a row decodes at
most `LEAD` tokens beyond those its consumer has `taken` (sent on), so a slow or vanished client
holds no unbounded backlog and is dropped within `LEAD` tokens of its cancellation. A job ends at
end-of-text or a stop string ("stop") or at its `max_tokens` ("length"). `submit` refuses work
beyond `max_queue` waiting jobs (`QueueFull`: the server answers 429) and after `close`
(`Closed`: 503), so no request waits without bound.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from typing import Callable

import jax
import numpy as np

from manifold.inference.slots import Prefilled, SlotDecoder

LEAD = 8  # tokens a row may decode beyond those its consumer has `taken`


def _keeps_up(job: Job) -> bool:
  """(Under the batcher's lock.) Whether `job`'s consumer is within `LEAD` tokens, so its row may step."""
  return job.unread < LEAD


class QueueFull(RuntimeError):
  """More jobs than `max_queue` would be waiting."""


class Closed(RuntimeError):
  """The batcher is shutting down."""


@dataclasses.dataclass(frozen=True)
class Token:
  id: int
  logprob: float
  top_ids: np.ndarray  # [K] the likeliest tokens at this position
  top_logprobs: np.ndarray  # [K] their log-probs

  def top(self, n: int) -> list[tuple[int, float]]:
    """The `n` likeliest (token, log-prob) pairs."""
    return list(zip(map(int, self.top_ids[:n]), map(float, self.top_logprobs[:n])))


@dataclasses.dataclass
class Event:
  """What a job has produced since its previous event."""

  text: str  # new text
  tokens: list[Token]  # the tokens drawn since the previous event
  finish: str | None = None  # "stop" | "length" once the job is done
  prompt: Prefilled | None = None  # the prompt's log-probs (the first event only)
  error: str | None = None  # the job failed (the server logs why)

  def then(self, later: Event) -> Event:
    """This event followed by `later`, as one."""
    return Event(self.text + later.text, self.tokens + later.tokens, later.finish, self.prompt or later.prompt,
                 later.error)  # fmt: skip


@dataclasses.dataclass
class Job:
  prompt: list[int]
  max_tokens: int  # prompt + max_tokens <= the model's max_seq_len (the caller checks)
  temperature: float
  top_p: float
  key: jax.Array  # a typed PRNG key: token i is drawn with fold_in(key, i)
  stop: tuple[str, ...]
  sink: Callable[[Event], None] | None  # called from the batcher's thread (set before `submit`)
  ignore_eos: bool = False  # end-of-text is a token like any other (benchmarks: fixed lengths)
  scores_prompt: bool = False  # its first event carries the prompt's log-probs (`echo` with `logprobs`)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  tokens: list[int] = dataclasses.field(default_factory=list)
  sent: int = 0  # characters of text already sent
  unread: int = 0  # tokens given to `sink` that its consumer has not yet `taken` (under the batcher's lock)


class Batcher:
  """Runs `decoder` for the jobs `submit`ted, on its own thread (`start` / `close`)."""

  def __init__(self, decoder: SlotDecoder, tokenizer, *, max_queue: int, say: Callable[[str], None] = print):
    self.decoder, self.tokenizer, self.max_queue, self.say = decoder, tokenizer, max_queue, say
    n = decoder.slots
    self.rows: list[Job | None] = [None] * n
    self.state = np.zeros((3, n), np.int32)  # per row: the last token, its position, the next token's index
    self.sampling = np.ones((2, n), np.float32)  # per row: temperature, top-p
    self.keys = jax.random.split(jax.random.key(0), n)
    self.waiting: collections.deque[Job] = collections.deque()
    self.wake = threading.Condition()
    self.closed = False
    self.thread = threading.Thread(target=self._run, name="batcher", daemon=True)
    self.stats = {"steps": 0, "tokens": 0, "admitted": 0, "refused": 0, "peak_rows": 0}

  def start(self) -> Batcher:
    self.thread.start()
    return self

  def close(self) -> None:
    """Stops the thread; jobs still queued or decoding end with an error event."""
    with self.wake:
      self.closed = True
      self.wake.notify()
    self.thread.join(timeout=60)

  def submit(self, jobs: list[Job]) -> None:
    """Queues `jobs` (all or none)."""
    with self.wake:
      if self.closed:
        raise Closed("the server is shutting down")
      if len(self.waiting) + len(jobs) > self.max_queue:
        self.stats["refused"] += 1
        raise QueueFull(f"{len(self.waiting)} completions are waiting (--max-queue {self.max_queue})")
      self.waiting.extend(jobs)
      self.wake.notify()

  def taken(self, job: Job, tokens: int) -> None:
    """`job`'s consumer has sent on `tokens` more of its tokens: its row may decode further."""
    with self.wake:
      job.unread -= tokens
      self.wake.notify()

  def cancel(self, jobs: list[Job]) -> None:
    """Drops `jobs` (their client went away): a queued one is never admitted, a decoding one frees its row."""
    with self.wake:
      for job in jobs:
        job.cancelled.set()
      self.wake.notify()

  @property
  def busy_rows(self) -> int:
    return sum(job is not None for job in self.rows)

  # -- the thread ------------------------------------------------------------------------------

  def _run(self) -> None:
    while True:
      with self.wake:
        self.wake.wait_for(self._has_work)
        if self.closed:
          break
      try:
        self._admit()
        self._step()
      except Exception as e:  # noqa: BLE001 -- a failed step fails its jobs, not the server
        self.say(f"decoding failed: {type(e).__name__}: {e}")
        for row, job in enumerate(self.rows):
          if job is not None:
            job.sink(Event("", [], error=f"{type(e).__name__}"))
            self.rows[row] = None
    for job in [*self.waiting, *filter(None, self.rows)]:
      job.sink(Event("", [], error="the server is shutting down"))

  def _has_work(self) -> bool:
    """(Under `wake`.) Closing, a queued job and a free row, a cancelled job, or a row to step."""
    free = any(job is None for job in self.rows)
    return (self.closed or (bool(self.waiting) and free)
            or any(job is not None and (job.cancelled.is_set() or _keeps_up(job)) for job in self.rows))  # fmt: skip

  def _admit(self) -> None:
    for row in range(len(self.rows)):
      job = self.rows[row]
      if job is not None and job.cancelled.is_set():
        self.rows[row] = None
      if self.rows[row] is not None:
        continue
      with self.wake:
        job = None
        while self.waiting and job is None:
          job = self.waiting.popleft()
          job = None if job.cancelled.is_set() else job
      if job is None:
        return
      try:
        pre = self.decoder.admit(row, job.prompt, key=job.key, temperature=job.temperature, top_p=job.top_p)
      except Exception as e:  # noqa: BLE001 -- this job fails; the others go on
        self.say(f"prefill failed: {type(e).__name__}: {e}")
        job.sink(Event("", [], error=type(e).__name__))
        continue
      self.stats["admitted"] += 1
      pre = jax.device_get(pre if job.scores_prompt else pre._replace(prompt_logprobs=None, prompt_top_ids=None,
                                                                     prompt_top_logprobs=None))  # fmt: skip
      if job.max_tokens == 0:  # the prompt's log-probs only
        job.sink(Event("", [], finish="length", prompt=pre))
        continue
      self.rows[row], self.keys = job, self.keys.at[row].set(job.key)
      self.state[1:, row] = len(job.prompt), 1
      self.sampling[:, row] = job.temperature, job.top_p
      self._take(row, pre.first, 0, prompt=pre if job.scores_prompt else None)
    self.stats["peak_rows"] = max(self.stats["peak_rows"], self.busy_rows)

  def _step(self) -> None:
    with self.wake:
      live = [row for row, job in enumerate(self.rows) if job is not None and _keeps_up(job)]
    if not live:
      return
    draw = jax.device_get(self.decoder.step(self.state, self.sampling, self.keys))
    self.stats["steps"] += 1
    self.state[1:, live] += 1
    for row in live:
      self._take(row, draw, row)

  def _take(self, row: int, draw, at: int, prompt: Prefilled | None = None) -> None:
    """Gives row `row`'s job the token at `draw[at]`; frees the row when the job is done."""
    job = self.rows[row]
    token = Token(int(draw.tokens[at]), float(draw.logprobs[at]), draw.top_ids[at], draw.top_logprobs[at])
    self.state[0, row] = token.id
    self.stats["tokens"] += 1
    ended = token.id == self.tokenizer.eos_id and not job.ignore_eos
    if not ended:
      job.tokens.append(token.id)
    done = ended or len(job.tokens) >= job.max_tokens
    text, finish = self._text(job, final=done)
    if finish is None and done:
      finish = "stop" if ended else "length"
    with self.wake:
      job.unread += 1
    job.sink(Event(text, [token], finish=finish, prompt=prompt))
    if finish is not None:
      self.rows[row] = None

  def _text(self, job: Job, *, final: bool) -> tuple[str, str | None]:
    """(the job's new text that can be sent, "stop" if a stop string ended it); unless `final`,
    text that may be the start of a stop string or of a UTF-8 character waits."""
    full = self.tokenizer.decode(np.asarray(job.tokens, np.int64))
    cut = min((i for i in (full.find(s, max(0, job.sent - len(s))) for s in job.stop) if i >= 0), default=-1)
    if cut >= 0:
      new, job.sent = full[job.sent : cut], cut
      return new, "stop"
    end = len(full)
    if not final:
      end -= max(map(len, job.stop), default=1) - 1  # a stop string may be starting at the end
      while end > job.sent and full[end - 1] == "\ufffd":  # an incomplete UTF-8 character
        end -= 1
      end = max(end, job.sent)
    new, job.sent = full[job.sent : end], end
    return new, None
