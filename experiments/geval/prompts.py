"""The G-Eval prompts: the task, and per criterion its score range, definition and evaluation steps.

Each criterion is one prompt in the paper's shape: the task, the criterion's definition, the
evaluation steps, then the dialogue, the summary and a form that asks for the score only.
Relevance, coherence and consistency are rated 1-5, fluency 1-3.
"""

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
