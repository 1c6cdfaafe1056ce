"""`manifold serve`: a real server process on a loopback port, spoken to with the real `openai` client.

One server (2 slots, a queue of 4, an API key) serves the trained tiny run for the whole module and
is always stopped. Its answers are checked against `manifold generate` (the same prompt, seed and
settings), against themselves one at a time, and for every bad input the API names.
"""

from __future__ import annotations

import concurrent.futures
import json
import shlex
import shutil
import subprocess
import sys
import time

import httpx
import openai
import pytest

from manifold import cli
from manifold.serve.api import CHAT_STOP, Message, chat_prompt
from manifold.serve.server import running_server

from .conftest import REPO, child_env, error_line

KEY = "test-key"
SLOTS, QUEUE = 2, 4


@pytest.fixture(scope="module")
def server(trained_workdir, compile_cache, tmp_path_factory):
  """(base URL, model name, the server's log path) of `manifold serve` on a free loopback port."""
  log = tmp_path_factory.mktemp("serve") / "serve.txt"
  flags = ["--slots", str(SLOTS), "--max-queue", str(QUEUE), "--api-key", KEY]
  env = child_env(compile_cache)
  with running_server(str(trained_workdir), str(log), flags=flags, env=env, timeout_s=300) as (url, _):
    yield url, trained_workdir.name, log


def client(url: str, key: str = KEY) -> openai.OpenAI:
  return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)


def generate(workdir, prompt: str, capsys, **flags) -> str:
  """What `manifold generate` prints (the prompt and its continuation)."""
  args = ["generate", "--workdir", str(workdir), "--prompt", prompt]
  for name, value in flags.items():
    args += [f"--{name.replace('_', '-')}", str(value)]
  capsys.readouterr()
  assert cli.main(args) == 0
  return capsys.readouterr().out[:-1]  # print's newline


def stream_text(chunks, chat: bool) -> str:
  if chat:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
  return "".join(c.choices[0].text for c in chunks if c.choices)


def test_completions_and_chat_equal_manifold_generate_streaming_or_not(server, trained_workdir, capsys):
  url, name, _ = server
  api = client(url)
  assert [m.id for m in api.models.list().data] == [name]
  for settings in (dict(temperature=0.0, top_p=1.0, seed=0), dict(temperature=0.8, top_p=0.95, seed=7)):
    want = generate(trained_workdir, "def ", capsys, max_new_tokens=24, top_k=0, **settings)
    args = dict(model=name, prompt="def ", max_tokens=24, **settings)
    done = api.completions.create(**args)
    assert "def " + done.choices[0].text == want, settings
    assert done.usage.prompt_tokens == 4 and 1 <= done.usage.completion_tokens <= 24
    streamed = stream_text(api.completions.create(**args, stream=True), chat=False)
    assert "def " + streamed == want, settings

    prompt = chat_prompt_text("say hi")
    want = generate(trained_workdir, prompt, capsys, max_new_tokens=24, top_k=0, **settings)[len(prompt) :]
    want = want.split(CHAT_STOP)[0]
    messages = [{"role": "user", "content": "say hi"}]
    chat = api.chat.completions.create(model=name, messages=messages, max_tokens=24, **settings)
    assert chat.choices[0].message.content == want
    streamed = stream_text(api.chat.completions.create(model=name, messages=messages, max_tokens=24, stream=True,
                                                       **settings), chat=True)  # fmt: skip
    assert streamed == want


def chat_prompt_text(user: str) -> str:
  from manifold.serve.api import Message

  return chat_prompt([Message(role="user", content=user)])


def test_concurrent_requests_give_the_tokens_they_give_one_at_a_time(server):
  """More completions than slots (some wait), sampled with seeds and n = 2: the same text as alone."""
  url, name, _ = server
  api = client(url)
  requests = [dict(prompt=p, seed=s, n=n, temperature=0.9, max_tokens=16 + 4 * s)
              for s, (p, n) in enumerate([("def ", 1), ("class ", 2), ("    return ", 1)])]  # fmt: skip

  def ask(r):
    return [c.text for c in api.completions.create(model=name, **r).choices]

  alone = [ask(r) for r in requests]
  with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
    together = list(pool.map(ask, requests))
  assert together == alone
  assert len(alone[1]) == 2 and alone[1][0] != alone[1][1]  # n choices draw with their own keys


def test_logprobs_and_echo_score_the_prompt_as_a_scorer_needs(server):
  url, name, _ = server
  body = client(url).completions.create(model=name, prompt="def f(x):", max_tokens=0, echo=True, logprobs=3)
  lp = body.choices[0].logprobs
  assert body.choices[0].text == "def f(x):" and lp.tokens == list("def f(x):")
  assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
  for t in range(1, len(lp.tokens)):  # each token's log-prob is at most its position's best
    assert len(lp.top_logprobs[t]) == 3 and max(lp.top_logprobs[t].values()) >= lp.token_logprobs[t] - 1e-6


def test_the_api_key_is_required(server):
  url, name, _ = server
  with pytest.raises(openai.AuthenticationError):
    client(url, key="wrong").completions.create(model=name, prompt="def ", max_tokens=2)
  assert httpx.get(f"{url}/v1/models").status_code == 401


def test_bad_requests_are_400s_naming_the_field_and_the_server_keeps_serving(server):
  url, name, _ = server
  headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
  good = {"model": name, "prompt": "def ", "max_tokens": 2}
  cases = {
    "malformed JSON": ("{not json", None),
    "a field of the wrong type": ({**good, "max_tokens": "ten"}, "max_tokens"),
    "max_tokens beyond the context": ({**good, "max_tokens": 10_000}, "max_tokens"),
    "a prompt longer than the context": ({**good, "prompt": "x" * 5000}, "prompt"),
    "negative temperature": ({**good, "temperature": -1}, "temperature"),
    "n too large": ({**good, "n": SLOTS + 1}, "n"),
    "an unknown model": ({**good, "model": "gpt-4"}, "model"),
    "an empty stop string": ({**good, "stop": [""]}, "stop"),
  }
  for case, (body, param) in cases.items():
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{url}/v1/completions", content=content, headers=headers, timeout=30)
    assert r.status_code == 400, (case, r.text)
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"], case
    if param:
      assert error["param"] == param and param in error["message"], (case, error)
  chat = {"model": name, "messages": [], "max_tokens": 2}
  r = httpx.post(f"{url}/v1/chat/completions", json=chat, headers=headers, timeout=30)
  assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
  assert client(url).completions.create(**good).choices[0].finish_reason in ("length", "stop")


def test_a_row_decodes_at_most_lead_tokens_ahead_of_its_consumer_and_resumes_unchanged():
  """A consumer that takes nothing pauses its row after `LEAD` tokens while the other row runs on;
  once taken, the paused job ends with the tokens of an identical job that was never paused."""
  import threading

  import jax
  from flax import nnx

  from manifold.data.tokenizer import ByteTokenizer
  from manifold.inference.slots import SlotDecoder
  from manifold.model import ModelConfig, Transformer
  from manifold.serve.batcher import LEAD, Batcher, Job

  cfg = ModelConfig(vocab_size=257, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                    max_seq_len=64)  # fmt: skip
  batcher = Batcher(SlotDecoder(Transformer(cfg, rngs=nnx.Rngs(params=0)), 2), ByteTokenizer(), max_queue=2,
                    say=lambda _: None)  # fmt: skip
  tokens, ended = {"slow": [], "eager": []}, {"slow": threading.Event(), "eager": threading.Event()}
  jobs = {}

  def sink(name, eager):
    def receive(event):
      tokens[name].extend(t.id for t in event.tokens)
      if eager:
        batcher.taken(jobs[name], len(event.tokens))
      if event.finish or event.error:
        ended[name].set()

    return receive

  for name in tokens:
    jobs[name] = Job([104, 105], 3 * LEAD, 1.0, 1.0, jax.random.key(7), (), sink(name, name == "eager"),
                     ignore_eos=True)  # fmt: skip
  batcher.start().submit(list(jobs.values()))
  try:
    assert ended["eager"].wait(120), "the row whose consumer keeps up did not finish"
    steps = batcher.stats["steps"]
    time.sleep(0.3)
    assert len(tokens["slow"]) == LEAD and not ended["slow"].is_set(), len(tokens["slow"])
    assert batcher.stats["steps"] == steps and batcher.busy_rows == 1, "a paused row was stepped"
    jobs["slow"].sink = sink("slow", eager=True)
    batcher.taken(jobs["slow"], LEAD)
    assert ended["slow"].wait(120), "the paused row did not resume"
  finally:
    batcher.close()
  assert len(tokens["eager"]) == 3 * LEAD and tokens["slow"] == tokens["eager"]


def test_a_full_queue_is_429_and_a_client_gone_mid_stream_frees_its_slot(server):
  url, name, _ = server
  headers = {"Authorization": f"Bearer {KEY}"}
  long = {"model": name, "prompt": "def ", "max_tokens": 60, "ignore_eos": True, "temperature": 0}
  with httpx.Client(headers=headers, timeout=120) as http:
    before = http.get(f"{url}/health").json()["tokens"]
    with http.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}) as r:
      next(r.iter_lines())  # the first chunk, then the client leaves
    deadline = time.monotonic() + 30
    while (health := http.get(f"{url}/health").json())["rows_busy"]:
      assert time.monotonic() < deadline, "a disconnected stream kept its slot"
      time.sleep(0.05)
    assert health["tokens"] - before < long["max_tokens"], "the stream's row decoded to the end without its client"

    def ask(_):
      return http.post(f"{url}/v1/completions", json=long).status_code

    with concurrent.futures.ThreadPoolExecutor(3 * (SLOTS + QUEUE)) as pool:
      codes = list(pool.map(ask, range(3 * (SLOTS + QUEUE))))
  assert codes.count(429) >= 1 and codes.count(200) >= SLOTS, codes
  assert set(codes) <= {200, 429}, codes


TASKS = REPO / "tests" / "fixtures" / "lm_eval"


class Direct:
  """The run's model scored without the server: a full forward per sequence, no cache, no batching."""

  def __init__(self, workdir):
    import jax
    import numpy as np
    from flax import nnx

    from manifold.serve.server import load_model

    loaded = load_model(str(workdir), say=lambda _: None)
    self.tokenizer, model, width = loaded.tokenizer, loaded.model, loaded.model.cfg.max_seq_len
    forward = nnx.jit(lambda m, tokens: jax.nn.log_softmax(m(tokens)[0][0], axis=-1))
    # Causal: padding after the sequence leaves its positions' log-probs as they are (one compile).
    self.log_probs = lambda ids: np.asarray(forward(model, np.pad([ids], ((0, 0), (0, width - len(ids))))))[: len(ids)]

  def loglikelihood(self, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's split: the context's trailing whitespace moves to the continuation, whose tokens
    are then those of context + continuation past the context's."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
    start = len(self.tokenizer.encode(context))
    ids = self.tokenizer.encode(context + continuation).tolist()
    lp = self.log_probs(ids)
    rows = range(start - 1, len(ids) - 1)
    return float(sum(lp[t, ids[t + 1]] for t in rows)), all(int(lp[t].argmax()) == ids[t + 1] for t in rows)

  def greedy(self, prompt: str, max_tokens: int, stops: list[str]) -> str:
    ids = self.tokenizer.encode(prompt).tolist()
    new = []
    for _ in range(max_tokens):
      new.append(int(self.log_probs(ids + new)[-1].argmax()))
    text = self.tokenizer.decode(new)
    return min((text[: text.index(s)] for s in stops if s in text), key=len, default=text)


def lm_eval_run(workdir, compile_cache, *flags) -> tuple[dict, dict]:
  """(scores per task, samples per task) of `manifold eval --tasks ... *flags` in a child process."""
  command = [sys.executable, "-m", "manifold.cli", "eval", "--workdir", str(workdir), "--include-path", str(TASKS),
             "--concurrency", str(SLOTS), *flags]  # fmt: skip
  done = subprocess.run(command, env=child_env(compile_cache), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  (out,) = (workdir / "lm_eval").iterdir()
  record = json.loads((out / "results.json").read_text())
  assert record["command"] == shlex.join(["manifold", *command[3:]])
  samples = {}
  for path in out.glob("samples_*.jsonl"):
    samples[path.stem.removeprefix("samples_")] = [json.loads(line) for line in path.read_text().splitlines()]
  return record["lm_eval"]["results"], samples


@pytest.fixture
def run_copy(trained_workdir, tmp_path):
  """A copy of the trained run that lm-eval results may be written into."""
  shutil.copytree(trained_workdir, tmp_path / "run")
  return tmp_path / "run"


def test_lm_eval_through_a_started_server_scores_as_the_model_does(run_copy, compile_cache):
  scores, samples = lm_eval_run(run_copy, compile_cache, "--tasks", "manifold_choice,manifold_generation")
  direct = Direct(run_copy)
  docs = [json.loads(line) for line in (TASKS / "multiple_choice.jsonl").read_text().splitlines()]
  assert len(samples["manifold_choice"]) == len(docs)
  acc, acc_norm = [], []
  for sample in samples["manifold_choice"]:
    doc = docs[sample["doc_id"]]
    want = [direct.loglikelihood(doc["context"], " " + choice) for choice in doc["choices"]]
    got = [tuple(r[0]) for r in sample["resps"]]
    for (ll, greedy), (ll_served, greedy_served) in zip(want, got, strict=True):
      assert abs(ll - ll_served) <= 1e-4 * max(1.0, abs(ll)) and greedy == greedy_served, (doc, want, got)
    lls = [ll for ll, _ in want]
    acc.append(float(max(range(len(lls)), key=lls.__getitem__) == doc["answer"]))
    normed = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]  # lm-eval: by the choice's characters
    acc_norm.append(float(max(range(len(lls)), key=normed.__getitem__) == doc["answer"]))
  assert scores["manifold_choice"]["acc,none"] == pytest.approx(sum(acc) / len(acc))
  assert scores["manifold_choice"]["acc_norm,none"] == pytest.approx(sum(acc_norm) / len(acc_norm))
  assert 0 < sum(acc_norm) < len(docs) or 0 < sum(acc) < len(docs)  # the check sees right and wrong answers
  matched = []
  for sample in samples["manifold_generation"]:
    want = direct.greedy(sample["doc"]["prompt"], 8, ["\n"])
    assert sample["resps"][0][0] == want, (sample["doc"], want)
    matched.append(float(want == sample["doc"]["target"]))
  assert scores["manifold_generation"]["exact_match,none"] == pytest.approx(sum(matched) / len(matched))


def test_lm_eval_chat_through_a_running_server_with_its_key(server, run_copy, compile_cache):
  url, _, _ = server
  scores, samples = lm_eval_run(
    run_copy, compile_cache, "--tasks", "manifold_generation", "--chat", "--server", url, "--api-key", KEY
  )
  direct = Direct(run_copy)
  for sample in samples["manifold_generation"]:
    prompt = chat_prompt([Message(role="user", content=sample["doc"]["prompt"])])
    assert sample["resps"][0][0] == direct.greedy(prompt, 8, ["\n", CHAT_STOP]), sample


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--tasks", "no_such_task"], "--tasks: unknown lm-eval task 'no_such_task'"),
    (["--tasks", "x", "--include-path", "/no/such/folder"], "--include-path /no/such/folder: not a folder"),
    (["--tasks", "x", "--num-batches", "2"], "--tasks scores lm-eval tasks; --sources and --num-batches"),
    (["--tasks", "x", "--server", "http://127.0.0.1:1", "--quantize", "int8"], "--server: the running server's"),
    (["--tasks", "x", "--concurrency", "0"], "--concurrency 0: must be at least 1"),
  ],
)
def test_eval_tasks_refuses_bad_flags_in_one_line_before_any_server_starts(run_copy, flags, message, capsys):
  assert cli.main(["eval", "--workdir", str(run_copy), *flags]) == 2
  assert message in error_line(capsys.readouterr().err)
  assert not (run_copy / "lm_eval").exists()
