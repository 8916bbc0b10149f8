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

The modules, in the order they build on each other:
- ``prompts``: the criteria, their score ranges and the prompt for each.
- ``parsing``: the score in an answer's text, and the score weighted by its log-probabilities.
- ``config``: ``GEvalConfig`` and whether G-Eval can run with it.
- ``client``: the openai client, the fail-fast check and ``GEvalUnavailable``.
- ``cache``: the SQLite request/response cache.
- ``scoring``: the judge of one prompt, and ``geval_scores`` over all examples and criteria.
"""

from experiments.geval.client import GEvalUnavailable, check_judge
from experiments.geval.config import GEvalConfig, geval_available
from experiments.geval.parsing import logprob_score, parse_score
from experiments.geval.prompts import CRITERIA, build_prompt
from experiments.geval.scoring import geval_scores

__all__ = [
    "CRITERIA",
    "GEvalConfig",
    "GEvalUnavailable",
    "build_prompt",
    "check_judge",
    "geval_available",
    "geval_scores",
    "logprob_score",
    "parse_score",
]
