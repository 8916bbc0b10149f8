"""The connection to the judge: the OpenAI-compatible client, the fail-fast check before scoring,
and the message that names the server, the model and what to check when the judge fails.

Rate-limit (429) and server (5xx) errors are retried with exponential back-off by the openai
client (``max_retries``). The API key is read from the environment variable named by
``api_key_env`` and is never written anywhere.
"""

import os

import openai

from experiments.geval.config import GEvalConfig


def open_client(
    config: GEvalConfig, max_retries: int | None = None, timeout: float | None = None
) -> openai.OpenAI:
    """An openai client for ``config``'s server; ``max_retries`` and ``timeout`` override the config's."""
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
    client = open_client(config, max_retries=0, timeout=min(config.timeout, 10.0))
    try:
        client.models.list()
    except openai.NotFoundError:
        pass  # a server without /models: the scoring requests will tell
    except (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError) as err:
        raise GEvalUnavailable(describe_failure(config, err)) from None
    finally:
        client.close()
