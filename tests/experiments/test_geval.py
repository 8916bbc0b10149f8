"""G-Eval against a real local HTTP server that speaks the chat-completions protocol.

The server runs on 127.0.0.1 (port 0) in a thread, answers from a script the test gives it,
counts what it is sent, refuses to answer more than MAX_REQUESTS and shuts itself down after
WATCHDOG_S seconds whatever happens. No traffic leaves the loopback interface.
"""

import json
import math
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest

from experiments.geval import (
    CRITERIA,
    GEvalConfig,
    GEvalUnavailable,
    build_prompt,
    geval_available,
    geval_scores,
    logprob_score,
    parse_score,
)

MAX_REQUESTS = 200
WATCHDOG_S = 60.0
KEY = "sk-test-0123456789-very-secret"

DIALOGUES = [
    "user: my parcel has not arrived\nagent: sorry, please DM us the order number",
    "user: the app crashes on start\nagent: please reinstall it",
]
SUMMARIES = ["Parcel missing; agent asks for the order number.", "App crashes; agent suggests reinstalling."]

Responder = Callable[
    [dict, int], tuple[int, dict, dict]
]  # (request body, request number) -> (status, body, headers)


def completion(contents: list[str], logprobs: list[list[dict]] | None = None) -> dict:
    """A chat.completion body with one choice per content (and its logprobs, if given)."""
    choices = []
    for i, content in enumerate(contents):
        choice = {"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        if logprobs is not None:
            choice["logprobs"] = {"content": logprobs[i]}
        choices.append(choice)
    return {
        "id": "cmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": "judge",
        "choices": choices,
    }


def token(text: str, p: float, top: dict[str, float] | None = None) -> dict:
    alternatives = [{"token": t, "logprob": math.log(q), "bytes": None} for t, q in (top or {}).items()]
    return {"token": text, "logprob": math.log(p), "bytes": None, "top_logprobs": alternatives}


class ChatServer:
    """A scripted chat-completions endpoint on loopback; `requests` holds every body received."""

    def __init__(self) -> None:
        self.respond: Responder = lambda body, n: (500, {"error": {"message": "no script"}}, {})
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests.append(body)
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                    number = len(server.requests)
                if self.path != "/v1/chat/completions" or number > MAX_REQUESTS:
                    status, payload, headers = 404, {"error": {"message": f"unexpected {self.path}"}}, {}
                else:
                    status, payload, headers = server.respond(body, number)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._watchdog = threading.Timer(WATCHDOG_S, self.httpd.shutdown)
        self._watchdog.daemon = True

    def __enter__(self) -> "ChatServer":
        self._thread.start()
        self._watchdog.start()
        return self

    def __exit__(self, *exc) -> None:
        self._watchdog.cancel()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)


@pytest.fixture
def server(monkeypatch):
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)  # loopback only, never through a proxy
    monkeypatch.setenv("GEVAL_TEST_KEY", KEY)
    with ChatServer() as s:
        yield s


def config(server: ChatServer, tmp_path, **overrides) -> GEvalConfig:
    settings = dict(
        model="judge",
        base_url=server.base_url,
        api_key_env="GEVAL_TEST_KEY",
        max_retries=0,
        timeout=10.0,
        concurrency=2,
        n_samples=4,
        cache_path=str(tmp_path / "cache.sqlite"),
    )
    return GEvalConfig(**(settings | overrides))


def criterion_of(body: dict) -> str:
    """Which criterion a request asks about, read back from its prompt's evaluation form."""
    prompt = body["messages"][0]["content"]
    return next(c for c in CRITERIA if prompt.endswith(f"- {c.capitalize()}:"))


# ----------------------------------------------------------------------------- prompts and parsing


def test_prompt_has_the_g_eval_structure():
    prompt = build_prompt("fluency", "user: hi\nagent: hello", "A greeting.")
    parts = [
        "Evaluation Criteria:",
        "Fluency (1-3)",
        "Evaluation Steps:",
        "Conversation:",
        "user: hi\nagent: hello",
        "Summary:",
        "A greeting.",
        "Evaluation Form (scores ONLY):",
    ]
    positions = [prompt.index(p) for p in parts]
    assert positions == sorted(positions)
    assert "Relevance (1-5)" in build_prompt("relevance", "d", "s")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4", 4.0),
        (" 3\n", 3.0),
        ("Coherence (1-5): 2", 2.0),
        ("Score: 4/5", 4.0),
        ("3.5", 3.5),
        ("7", None),
        ("0", None),
        ("no idea", None),
        ("", None),
    ],
)
def test_parse_score(text, expected):
    parsed = parse_score(text, 1, 5)
    assert (parsed[0] if parsed else None) == expected


def test_logprob_score_reads_the_score_token_after_an_echoed_range():
    tokens = [
        token("Coherence", 0.9),
        token(" (", 0.9),
        token("1", 0.9),
        token("-", 0.9),
        token("5", 0.9),
        token("):", 0.9),
        token(" 4", 0.6, {" 4": 0.6, " 2": 0.3, " the": 0.1}),
    ]
    assert logprob_score("Coherence (1-5): 4", tokens, 1, 5) == pytest.approx((4 * 0.6 + 2 * 0.3) / 0.9)


# ----------------------------------------------------------------------------- against the server


def test_logprob_weighting_on_known_token_probabilities(server, tmp_path):
    # "4" and " 4" both mean 4; "9" is outside every scale; "The" is no score
    top = {"4": 0.5, "3": 0.2, " 4": 0.1, "5": 0.05, "The": 0.1, "9": 0.05}
    top_fluency = {"3": 0.4, "4": 0.3, "2": 0.2, "1": 0.1}  # fluency is 1..3: "4" does not count

    def respond(body, number):
        if criterion_of(body) == "fluency":
            return 200, completion(["3"], [[token("3", 0.4, top_fluency)]]), {}
        return 200, completion(["4"], [[token("4", 0.5, top)]]), {}

    server.respond = respond
    result = geval_scores(DIALOGUES[:1], SUMMARIES[:1], config(server, tmp_path, top_logprobs=6))

    valid_1_5 = {4: 0.5 + 0.1, 3: 0.2, 5: 0.05}
    expected = sum(v * p for v, p in valid_1_5.items()) / sum(valid_1_5.values())
    for criterion in ("relevance", "coherence", "consistency"):
        assert result[criterion] == pytest.approx(expected)
    assert result["fluency"] == pytest.approx((3 * 0.4 + 2 * 0.2 + 1 * 0.1) / 0.7)
    assert result["method"] == {c: "logprobs" for c in CRITERIA}
    assert len(server.requests) == 4  # one request per criterion: no sampling needed
    assert all(r["logprobs"] is True and r["top_logprobs"] == 6 and r["n"] == 1 for r in server.requests)
    assert server.auth_headers == [f"Bearer {KEY}"] * 4


@pytest.mark.parametrize("honours_n", [True, False])
def test_samples_fallback_when_the_server_returns_no_logprobs(server, tmp_path, honours_n):
    answers = ["3", "4", "Score: 5", "2"]  # answered in this order, per criterion
    served = {c: 0 for c in CRITERIA}

    def respond(body, number):
        # a server that honours `n` gives n answers at once; one that ignores it gives one per request
        criterion = criterion_of(body)
        count = body.get("n", 1) if honours_n else 1
        batch = answers[served[criterion] : served[criterion] + count]
        served[criterion] += count
        return 200, completion(batch), {}  # no logprobs field at all

    server.respond = respond
    result = geval_scores(DIALOGUES[:1], SUMMARIES[:1], config(server, tmp_path), criteria=("coherence",))

    assert result["coherence"] == pytest.approx((3 + 4 + 5 + 2) / 4)
    assert result["method"] == {"coherence": "samples"}
    # first the logprobs request (one answer, which counts as a sample), then top-ups for the other three
    assert len(server.requests) == (2 if honours_n else 4)
    assert server.requests[0]["logprobs"] is True
    assert [r.get("n") for r in server.requests[1:]] == ([3] if honours_n else [3, 2, 1])


def test_samples_without_asking_for_logprobs(server, tmp_path):
    server.respond = lambda body, n: (200, completion(["2", "3", "3", "oops"][: body["n"]]), {})
    result = geval_scores(
        DIALOGUES[:1], SUMMARIES[:1], config(server, tmp_path, use_logprobs=False), ("fluency",)
    )
    assert result["fluency"] == pytest.approx((2 + 3 + 3) / 3)  # the unparsable fourth answer is left out
    assert [r["n"] for r in server.requests] == [4] and "logprobs" not in server.requests[0]
    assert result["failure_texts"] == [{"criterion": "fluency", "index": 0, "text": "oops"}]
    assert result["failures"] == {"fluency": 0}  # the example still has a score


def test_garbled_answer_is_a_recorded_failure_not_a_crash(server, tmp_path):
    garbled = "As an AI I would rather not rate this."

    def respond(body, number):
        prompt = body["messages"][0]["content"]
        if "parcel" in prompt:  # the first example gets a garbled answer, the second a clean 4
            return 200, completion([garbled], [[token("As", 0.9, {"As": 0.9, "4": 0.05})]]), {}
        return 200, completion(["4"], [[token("4", 1.0, {"4": 1.0})]]), {}

    server.respond = respond
    failures_path = tmp_path / "failures.jsonl"
    result = geval_scores(
        DIALOGUES, SUMMARIES, config(server, tmp_path), ("relevance",), failures_path=failures_path
    )

    assert result["relevance"] == pytest.approx(4.0)
    assert result["per_example"]["relevance"] == [None, 4.0]
    assert result["scored"] == {"relevance": 1} and result["failures"] == {"relevance": 1}
    assert result["failure_texts"] == [{"criterion": "relevance", "index": 0, "text": garbled}]
    lines = [json.loads(line) for line in failures_path.read_text().splitlines()]
    assert lines == result["failure_texts"]


def test_rate_limit_is_retried_with_backoff(server, tmp_path):
    def respond(body, number):
        if number == 1:  # the first request is rate limited; retry-after-ms keeps the back-off short
            return 429, {"error": {"message": "slow down", "type": "rate_limit"}}, {"retry-after-ms": "20"}
        return 200, completion(["5"], [[token("5", 1.0, {"5": 1.0})]]), {}

    server.respond = respond
    result = geval_scores(
        DIALOGUES[:1], SUMMARIES[:1], config(server, tmp_path, max_retries=2), ("consistency",)
    )
    assert result["consistency"] == pytest.approx(5.0)
    assert len(server.requests) == 2
    assert server.requests[0] == server.requests[1]


def test_rate_limit_without_retries_left_raises(server, tmp_path):
    server.respond = lambda body, n: (429, {"error": {"message": "slow down"}}, {"retry-after-ms": "1"})
    with pytest.raises(
        GEvalUnavailable,
        match=r"G-Eval failed at http://127\.0\.0\.1:\d+/v1 with model 'judge' "
        r"\(RateLimitError",
    ) as info:
        geval_scores(DIALOGUES[:1], SUMMARIES[:1], config(server, tmp_path, max_retries=1), ("consistency",))
    assert isinstance(info.value.__cause__, openai.RateLimitError)
    assert len(server.requests) == 2  # the request and its one retry


def test_second_run_is_served_from_the_cache(server, tmp_path):
    server.respond = lambda body, n: (200, completion(["3"], [[token("3", 0.7, {"3": 0.7, "2": 0.3})]]), {})
    first = geval_scores(DIALOGUES, SUMMARIES, config(server, tmp_path))
    assert len(server.requests) == 2 * len(CRITERIA)
    second = geval_scores(DIALOGUES, SUMMARIES, config(server, tmp_path))
    assert len(server.requests) == 2 * len(CRITERIA)  # the server saw nothing new
    assert second == first
    # another model is another key: asked again
    geval_scores(DIALOGUES[:1], SUMMARIES[:1], config(server, tmp_path, model="other-judge"), ("fluency",))
    assert len(server.requests) == 2 * len(CRITERIA) + 1


def test_interrupted_run_resumes_where_it_stopped(server, tmp_path):
    def failing(body, number):  # the server breaks down for every request about the second dialogue
        if "crashes" in body["messages"][0]["content"]:
            return 500, {"error": {"message": "boom"}}, {}
        return 200, completion(["3"], [[token("3", 1.0, {"3": 1.0})]]), {}

    server.respond = failing
    with pytest.raises(GEvalUnavailable, match="InternalServerError"):
        geval_scores(DIALOGUES, SUMMARIES, config(server, tmp_path, concurrency=1))
    answered = {
        json.dumps(r, sort_keys=True) for r in server.requests if "crashes" not in r["messages"][0]["content"]
    }
    assert answered  # some work got done before the failure

    before = len(server.requests)
    server.respond = lambda body, n: (200, completion(["3"], [[token("3", 1.0, {"3": 1.0})]]), {})
    result = geval_scores(DIALOGUES, SUMMARIES, config(server, tmp_path, concurrency=1))
    resent = {json.dumps(r, sort_keys=True) for r in server.requests[before:]}
    assert not resent & answered  # nothing answered before was paid for again
    assert len(answered) + len(resent) == 2 * len(CRITERIA)
    assert {c: result[c] for c in CRITERIA} == {c: pytest.approx(3.0) for c in CRITERIA}, result


def test_api_key_is_never_written(server, tmp_path):
    def respond(body, number):
        if criterion_of(body) == "fluency":  # a failure, so that the failures file has content
            return 200, completion(["unsure"], [[token("unsure", 1.0)]]), {}
        return 200, completion(["2"], [[token("2", 1.0, {"2": 1.0})]]), {}

    server.respond = respond
    result = geval_scores(DIALOGUES, SUMMARIES, config(server, tmp_path), failures_path=tmp_path / "f.jsonl")
    (tmp_path / "record.json").write_text(json.dumps(result))  # what evaluate would store
    assert set(server.auth_headers) == {f"Bearer {KEY}"}  # the key was used ...
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"cache.sqlite", "f.jsonl", "record.json"}
    for path in files:  # ... and written nowhere
        assert KEY.encode() not in path.read_bytes(), path


def test_availability(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("GEVAL_ABSENT_KEY", raising=False)
    ok, reason = geval_available(GEvalConfig(api_key_env="GEVAL_ABSENT_KEY"))
    assert not ok and "GEVAL_ABSENT_KEY" in reason
    assert geval_available(GEvalConfig(api_key_env="GEVAL_ABSENT_KEY", base_url="http://127.0.0.1:8000/v1"))[
        0
    ]
    monkeypatch.setenv("GEVAL_ABSENT_KEY", "x")
    assert geval_available(GEvalConfig(api_key_env="GEVAL_ABSENT_KEY"))[0]
    assert not geval_available(GEvalConfig(model="", api_key_env="GEVAL_ABSENT_KEY"))[0]


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="n_samples must be a positive integer, got 0"):
        GEvalConfig(n_samples=0)
