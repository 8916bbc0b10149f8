"""Scoring: the judge that asks for one criterion's score of one summary (by log-probabilities
or by samples: the package docstring says how), and ``geval_scores``, which judges every example
on every criterion concurrently and aggregates the scores. An answer that does not parse is a
recorded failure, never a crash.
"""

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import openai

from experiments.geval.cache import ResponseCache
from experiments.geval.client import GEvalUnavailable, describe_failure, open_client
from experiments.geval.config import GEvalConfig
from experiments.geval.parsing import logprob_score, parse_score
from experiments.geval.prompts import CRITERIA, build_prompt, score_range
from peftcore.files import write_atomically


@dataclass
class _Outcome:
    score: float | None
    method: str | None  # "logprobs" | "samples"; None when nothing parsed
    failures: list[str]  # the texts of answers that did not parse


class _Judge:
    """Sends one prompt, reads the score; every request goes through the cache first."""

    def __init__(self, config: GEvalConfig, cache: ResponseCache) -> None:
        self.config, self.cache, self.client = config, cache, open_client(config)

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
