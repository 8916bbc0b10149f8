"""GEvalConfig, where and how to ask the judge model, and whether G-Eval can run with it."""

import os
from dataclasses import dataclass


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
