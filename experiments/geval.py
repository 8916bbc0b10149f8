"""G-Eval (Liu et al., 2023): an LLM rates each summary on four criteria, through any
OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama, a proxy).

Each criterion is one prompt in the paper's shape: the task, the criterion's definition, the
evaluation steps, then the dialogue, the summary and a form that asks for the score only.
Relevance, coherence and consistency are rated 1-5, fluency 1-3.

Scoring, per example and criterion:
- ``logprobs``: when the server returns token log-probabilities, the score is the
  probability-weighted mean over the score values at the answer's score token (the
  paper's form), renormalised over the valid score tokens among the ``top_logprobs``.
- ``samples``: otherwise, the mean of the integers parsed from ``n_samples`` sampled answers
  (the paper's fallback for models without log-probabilities).

Cost control: every request and its response are cached in SQLite, keyed by a hash of the
server, model, prompt and sampling settings, and committed as they arrive, so a rerun, or a
rerun after a crash, pays for nothing twice and resumes where it stopped. Rate-limit (429) and
server (5xx) errors are retried with exponential back-off by the openai client
(``max_retries``). An answer that does not parse is a recorded failure, never a crash. The API
key is read from the environment variable named by ``api_key_env`` and is never written
anywhere: not in the cache, the failures file or the returned settings.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

from peftcore.files import write_atomically

# ----------------------------------------------------------------------------- prompts

_TASK = (
    "You will be given a conversation between a customer and a customer-support agent, taken from "
    "a company's support channel on Twitter, and a short summary written for that conversation.\n\n"
    "Your task is to rate the summary on one criterion, described below.\n\n"
    "Read these instructions closely before you start, and come back to them while you judge."
)

# criterion -> (lowest score, highest score, definition, evaluation steps)
_CRITERIA: dict[str, tuple[int, int, str, str]] = {
    "relevance": (
        1,
        5,
        "Relevance ({lo}-{hi}) - does the summary keep what matters in the conversation and only that? "
        "A relevant summary states the customer's problem or request and what the agent did or proposed "
        "about it. Penalise summaries that leave out the problem or the outcome, and summaries that spend "
        "their words on greetings, apologies, small talk or repeated details.",
        "1. Read the conversation and note the customer's problem or request and how the agent responded.\n"
        "2. Read the summary and check which of these points it covers.\n"
        "3. Note any content in the summary that is unimportant or redundant.\n"
        "4. Assign a relevance score from {lo} to {hi}.",
    ),
    "coherence": (
        1,
        5,
        "Coherence ({lo}-{hi}) - is the summary well structured and organised as a whole? A coherent summary "
        "reads as one account of the conversation, its sentences following each other in a sensible order "
        "(problem, then the agent's response, then the outcome) rather than a heap of disconnected facts.",
        "1. Read the conversation and identify its course: the problem raised, the exchange, the outcome.\n"
        "2. Read the summary and check whether it follows that course in a clear, logical order.\n"
        "3. Check whether each sentence connects to the one before it.\n"
        "4. Assign a coherence score from {lo} to {hi}.",
    ),
    "consistency": (
        1,
        5,
        "Consistency ({lo}-{hi}) - is every statement in the summary supported by the conversation? A "
        "consistent summary states no fact that the conversation does not contain. Penalise summaries with "
        "hallucinated facts: invented products, numbers, actions or outcomes, or an action attributed to "
        "the wrong speaker (the customer instead of the agent, or the other way round).",
        "1. Read the conversation carefully and note who said and did what.\n"
        "2. Read the summary and compare each of its statements with the conversation.\n"
        "3. Look for statements that the conversation contradicts or does not support.\n"
        "4. Assign a consistency score from {lo} to {hi}.",
    ),
    "fluency": (
        1,
        3,
        "Fluency ({lo}-{hi}) - is the summary well written, sentence by sentence? Judge grammar, spelling, "
        "punctuation, word choice and sentence structure.\n"
        "- 1: Poor. Errors make the summary hard to understand.\n"
        "- 2: Fair. Some errors affect the clarity or smoothness of the text, but the main points are clear.\n"
        "- 3: Good. Few or no errors; the summary is easy to read and follow.",
        "1. Read the summary sentence by sentence.\n"
        "2. Note errors of grammar, spelling or punctuation, and awkward or unclear sentences.\n"
        "3. Assign a fluency score from {lo} to {hi}.",
    ),
}
CRITERIA = tuple(_CRITERIA)


def score_range(criterion: str) -> tuple[int, int]:
    """Lowest and highest score of ``criterion``: (1, 5), or (1, 3) for fluency."""
    lo, hi, _, _ = _CRITERIA[criterion]
    return lo, hi


def build_prompt(criterion: str, dialogue: str, summary: str) -> str:
    """The G-Eval prompt that asks for the score of ``summary`` on ``criterion``."""
    lo, hi, definition, steps = _CRITERIA[criterion]
    return (
        f"{_TASK}\n\n"
        f"Evaluation Criteria:\n\n{definition.format(lo=lo, hi=hi)}\n\n"
        f"Evaluation Steps:\n\n{steps.format(lo=lo, hi=hi)}\n\n"
        f"Conversation:\n\n{dialogue}\n\n"
        f"Summary:\n\n{summary}\n\n"
        f"Evaluation Form (scores ONLY):\n\n- {criterion.capitalize()}:"
    )


# ----------------------------------------------------------------------------- parsing answers

_RANGE = re.compile(r"\d\s*-\s*\d")  # an echoed "(1-5)" is not the score
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?")


def parse_score(text: str, lo: int, hi: int) -> tuple[float, int] | None:
    """The first number in ``text`` that is not part of a range such as "1-5", with its character
    offset, or ``None`` when there is none or it lies outside ``lo..hi``."""
    masked = _RANGE.sub(lambda m: " " * len(m.group()), text)
    match = _NUMBER.search(masked)
    if match is None or not lo <= float(match.group()) <= hi:
        return None
    return float(match.group()), match.start()


def _token_score(token: str, lo: int, hi: int) -> int | None:
    token = token.strip()
    return int(token) if token.isascii() and token.isdigit() and lo <= int(token) <= hi else None


def logprob_score(content: str, logprobs: list[dict[str, Any]], lo: int, hi: int) -> float | None:
    """Probability-weighted score at the answer's score token, or ``None`` when that fails.

    ``logprobs`` is the choice's ``logprobs.content``: per generated token, its ``token``,
    ``logprob`` and ``top_logprobs``. The score token is the token at the offset of the number
    that ``parse_score`` finds in ``content``; among its alternatives, those that are score values
    (" 4" and "4" both count for 4) share the probability mass, renormalised to sum to one.
    """
    parsed = parse_score(content, lo, hi)
    if parsed is None:
        return None
    end = 0
    for entry in logprobs:  # the token whose span covers the number's first character
        end += len(entry["token"])
        if end > parsed[1]:
            break
    else:
        return None
    # it must be the whole score, a leading space allowed (not "4." or "45")
    if _token_score(entry["token"], lo, hi) != parsed[0]:
        return None
    alternatives = {alt["token"]: alt["logprob"] for alt in entry.get("top_logprobs") or []}
    alternatives.setdefault(entry["token"], entry["logprob"])
    mass: dict[int, float] = {}
    for token, logprob in alternatives.items():
        value = _token_score(token, lo, hi)
        if value is not None:
            mass[value] = mass.get(value, 0.0) + math.exp(logprob)
    total = sum(mass.values())
    return sum(value * p for value, p in mass.items()) / total


# ----------------------------------------------------------------------------- configuration


@dataclass
class GEvalConfig:
    """Where and how to ask the judge model.

    Args:
        model: Model name the server knows (the paper used GPT-4).
        base_url: An OpenAI-compatible endpoint, e.g. ``http://localhost:8000/v1`` (vLLM) or
            ``http://localhost:11434/v1`` (Ollama); ``None`` is OpenAI's (or ``$OPENAI_BASE_URL``).
        api_key_env: Name of the environment variable that holds the API key. The key itself is
            never logged, cached or written. Local servers often need none: with ``base_url`` set
            and the variable unset, a placeholder key is sent.
        max_retries: Retries with exponential back-off on connection errors, 408/409/429 and 5xx.
        timeout: Seconds before one request is abandoned (then retried).
        concurrency: Requests in flight at once.
        n_samples: Answers averaged per example when the server returns no log-probabilities.
        temperature: Sampling temperature of every request.
        use_logprobs: Ask for log-probabilities and weight the score tokens by them; ``False``
            always samples ``n_samples`` answers.
        top_logprobs: Alternatives per token to ask for (OpenAI and vLLM allow at most 20).
        max_tokens: Longest answer; the form asks for a score only.
        cache_path: SQLite file for the request/response cache; ``None`` disables it.
    """

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_retries: int = 6
    timeout: float = 60.0
    concurrency: int = 4
    n_samples: int = 20
    temperature: float = 1.0
    use_logprobs: bool = True
    top_logprobs: int = 20
    max_tokens: int = 16
    cache_path: str | None = "~/.cache/peftcore/geval.sqlite"

    def __post_init__(self) -> None:
        for name in ("concurrency", "n_samples", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"GEvalConfig.{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_retries < 0:
            raise ValueError(f"GEvalConfig.max_retries must be >= 0, got {self.max_retries}")


def geval_available(config: GEvalConfig) -> tuple[bool, str]:
    """Whether G-Eval can run with ``config``, and if not, why (for the evaluation's notes)."""
    if not config.model:
        return False, "G-Eval skipped: no judge model configured (GEvalConfig.model)"
    if not os.environ.get(config.api_key_env) and not (config.base_url or os.environ.get("OPENAI_BASE_URL")):
        return False, (
            f"G-Eval skipped: ${config.api_key_env} is not set and no base_url points to a local "
            "OpenAI-compatible server"
        )
    return True, f"G-Eval with {config.model} at {config.base_url or 'the OpenAI API'}"


def _client(
    config: GEvalConfig, max_retries: int | None = None, timeout: float | None = None
) -> openai.OpenAI:
    api_key = os.environ.get(config.api_key_env) or "no-key"  # local servers ignore it; openai requires one
    return openai.OpenAI(
        api_key=api_key,
        base_url=config.base_url,
        max_retries=config.max_retries if max_retries is None else max_retries,
        timeout=config.timeout if timeout is None else timeout,
    )


class GEvalUnavailable(RuntimeError):
    """The judge cannot be used at all: the server is unreachable, the key is refused, the model is
    unknown, or errors persist after the retries. The message names the server and the model."""


def describe_failure(config: GEvalConfig, err: Exception) -> str:
    where = config.base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
    if isinstance(err, openai.APIConnectionError):
        check = "that a server is listening at that URL (an OpenAI-compatible base_url ends in /v1)"
    elif isinstance(err, (openai.AuthenticationError, openai.PermissionDeniedError)):
        check = f"the API key in ${config.api_key_env}"
    elif isinstance(err, openai.NotFoundError):
        check = f"that the server serves the model {config.model!r} (--geval.model)"
    else:
        check = "the server's status"
    return (
        f"G-Eval failed at {where} with model {config.model!r} ({type(err).__name__}: {err}). Check {check}; "
        "a rerun resumes from the request cache"
    )


def check_judge(config: GEvalConfig) -> None:
    """Fail fast, before any scoring: one request for the server's model list, without retries.
    Raises GEvalUnavailable when the server cannot be reached or refuses the key."""
    client = _client(config, max_retries=0, timeout=min(config.timeout, 10.0))
    try:
        client.models.list()
    except openai.NotFoundError:
        pass  # a server without /models: the scoring requests will tell
    except (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError) as err:
        raise GEvalUnavailable(describe_failure(config, err)) from None
    finally:
        client.close()


# ----------------------------------------------------------------------------- cache


class ResponseCache:
    """Chat-completion responses in SQLite, one row per request hash, committed on arrival.

    Safe to share between the threads of one process (one connection behind a lock).
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path).expanduser()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            ":memory:" if self.path is None else self.path, check_same_thread=False, isolation_level=None
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, response TEXT NOT NULL)"
        )
        self._lock = threading.Lock()

    @staticmethod
    def key(request: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, response: dict[str, Any]) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?)", (key, json.dumps(response)))

    def close(self) -> None:
        self._db.close()


# ----------------------------------------------------------------------------- scoring


@dataclass
class _Outcome:
    score: float | None
    method: str | None  # "logprobs" | "samples"; None when nothing parsed
    failures: list[str]  # the texts of answers that did not parse


class _Judge:
    """Sends one prompt, reads the score; every request goes through the cache first."""

    def __init__(self, config: GEvalConfig, cache: ResponseCache) -> None:
        self.config, self.cache, self.client = config, cache, _client(config)

    def request(self, prompt: str, n: int, logprobs: bool, round_: int) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
            "n": n,
        }
        if logprobs:
            params.update(logprobs=True, top_logprobs=self.config.top_logprobs)
        # round_ tells apart the top-up requests of a server that ignores `n` (same params, new samples)
        key = self.cache.key({**params, "base_url": self.config.base_url, "round": round_})
        response = self.cache.get(key)
        if response is None:
            response = self.client.chat.completions.create(**params).model_dump(mode="json")
            self.cache.put(key, response)
        return response

    def score(self, criterion: str, dialogue: str, summary: str) -> _Outcome:
        lo, hi = score_range(criterion)
        prompt = build_prompt(criterion, dialogue, summary)
        n = self.config.n_samples
        choices: list[dict[str, Any]] = []
        if self.config.use_logprobs:
            # Some servers reject the logprobs options: sample instead (a real 400 recurs there).
            with contextlib.suppress(openai.BadRequestError):
                choices = self.request(prompt, 1, True, 0)["choices"]
            if choices:
                content = choices[0]["message"].get("content") or ""
                logprobs = (choices[0].get("logprobs") or {}).get("content")
                if logprobs and parse_score(content, lo, hi) is None:
                    return _Outcome(None, None, [content])
                if logprobs and (value := logprob_score(content, logprobs, lo, hi)) is not None:
                    return _Outcome(value, "logprobs", [])
            # no log-probabilities, or a score that is not a token of its own: that answer is one sample
        # a server that ignores `n` answers once per request: top up, n requests at most
        start = 1 if self.config.use_logprobs else 0
        for round_ in range(start, start + n):
            if len(choices) >= n:
                break
            try:
                more = self.request(prompt, n - len(choices), False, round_)["choices"]
            except openai.BadRequestError as err:  # e.g. a prompt over the context length: this example only
                return _Outcome(None, None, [f"request rejected: {err}"])
            if not more:
                break
            choices = choices + more
        texts = [c["message"].get("content") or "" for c in choices[:n]]
        parsed = [parse_score(t, lo, hi) for t in texts]
        values = [p[0] for p in parsed if p is not None]
        failures = [t for t, p in zip(texts, parsed) if p is None]
        if not values:
            return _Outcome(None, None, failures)
        return _Outcome(sum(values) / len(values), "samples", failures)


def geval_scores(
    dialogues: list[str],
    summaries: list[str],
    config: GEvalConfig,
    criteria: tuple[str, ...] = CRITERIA,
    failures_path: str | Path | None = None,
) -> dict[str, Any]:
    """G-Eval scores of ``summaries`` given their ``dialogues``.

    Args:
        dialogues: One dialogue text per example.
        summaries: The summary to judge, one per example.
        config: Server, model and sampling settings.
        criteria: Which of relevance, coherence, consistency, fluency to score.
        failures_path: If given, a JSONL file (written atomically) with one line per answer that
            did not parse: criterion, example index and the answer's text.

    Returns:
        ``{criterion: mean score or None}`` for each criterion, plus ``"method"`` (per criterion,
        "logprobs", "samples", "logprobs+samples" when some examples needed each, or None),
        ``"scored"`` and ``"failures"`` (per criterion, examples with and without a score),
        ``"failure_texts"`` (the unparsed answers, and the errors of requests the server rejected
        with 400, say a prompt over the context length), ``"per_example"`` (per criterion, one score or
        None per example) and ``"settings"`` (the config, without any key).

    Raises:
        GEvalUnavailable: Authentication, permission or model-not-found errors, and rate-limit,
            server or connection errors still failing after ``max_retries``, with the server and
            model named. What was answered before is in the cache: rerun to resume.
    """
    if len(dialogues) != len(summaries):
        raise ValueError(f"got {len(dialogues)} dialogues but {len(summaries)} summaries")
    unknown = set(criteria) - set(CRITERIA)
    if unknown:
        raise ValueError(f"unknown G-Eval criteria {sorted(unknown)}; the criteria are {list(CRITERIA)}")
    cache = ResponseCache(config.cache_path)
    judge = _Judge(config, cache)
    jobs = [(c, i) for c in criteria for i in range(len(dialogues))]
    try:
        with ThreadPoolExecutor(max_workers=config.concurrency) as pool:
            futures = [pool.submit(judge.score, c, dialogues[i], summaries[i]) for c, i in jobs]
            try:
                outcomes = [f.result() for f in futures]
            except BaseException as err:
                for f in futures:  # stop paying for requests whose results would be thrown away
                    f.cancel()
                if isinstance(err, openai.APIError):
                    raise GEvalUnavailable(describe_failure(config, err)) from err
                raise
    finally:
        judge.client.close()
        cache.close()

    result: dict[str, Any] = {
        "method": {},
        "scored": {},
        "failures": {},
        "failure_texts": [],
        "per_example": {},
    }
    for criterion in criteria:
        mine = [(i, o) for (c, i), o in zip(jobs, outcomes) if c == criterion]
        scores = [o.score for _, o in mine]
        valid = [s for s in scores if s is not None]
        methods = sorted({o.method for _, o in mine if o.method})
        result[criterion] = sum(valid) / len(valid) if valid else None
        result["method"][criterion] = "+".join(methods) or None
        result["scored"][criterion] = len(valid)
        result["failures"][criterion] = len(scores) - len(valid)
        result["per_example"][criterion] = scores
        for i, o in mine:
            result["failure_texts"] += [{"criterion": criterion, "index": i, "text": t} for t in o.failures]
    result["settings"] = asdict(config)
    if failures_path is not None:
        write_atomically(Path(failures_path), "".join(json.dumps(f) + "\n" for f in result["failure_texts"]))
        result["failures_path"] = str(failures_path)
    return result
