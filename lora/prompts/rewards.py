"""Reward functions for GRPO recipes, by name: the recipe's `reward_functions` list picks from this registry.

A reward reads one sampled completion and returns a float (or None to abstain; TRL then ignores it for that
completion). Answers are read with the evaluation harness's own rules (lora/prompts/parsing.py), so what a GRPO run
optimises is what `eval.harness.evaluation.evaluate_tasks` scores.

Add your own with a few lines, in this file (or in any module imported before the recipe is resolved):

    from lora.prompts.rewards import Sample, register_reward

    @register_reward("short_answer")
    def short_answer(sample: Sample) -> float:
        return 1.0 if len(sample.answer.split()) <= 3 else 0.0

then name it in a recipe: "reward_functions": ["exact_match", "short_answer"], "reward_weights": [1.0, 0.2].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from lora.core.errors import UserError
from lora.prompts import parsing

__all__ = [
    "answer_format",
    "build_trl_reward",
    "checked_score",
    "completion_text",
    "exact_match",
    "exact_number",
    "infer_labels",
    "label_match",
    "MAX_INFERRED_LABELS",
    "NUMERIC_ABS_TOLERANCE",
    "numeric_closeness",
    "numeric_match",
    "register_reward",
    "reward_names",
    "RewardError",
    "RewardFunction",
    "REWARDS",
    "Sample",
]

# Numbers within this absolute distance of the target always count as equal: the bundled numeric tasks round to
# one decimal and the calc eval task uses the same floor (eval/tasks.json abs_tol), so a 0 target is reachable.
NUMERIC_ABS_TOLERANCE = 0.005
# Classification label sets are inferred from the training targets only when they are this few distinct values.
MAX_INFERRED_LABELS = 20


@dataclass(frozen=True)
class Sample:
    """One prompt/completion pair as a reward function sees it.

    Attributes:
        completion: the generated text (special tokens removed).
        target: the row's reference answer.
        prompt: the text the model was prompted with.
        finished: True when the model ended the answer itself (end-of-sequence) rather than hitting
            max_completion_length.
        token_ids: the generated token ids (with the end-of-sequence token when finished).
        labels: the task's answer set when the training targets are a few distinct labels, else ().
        tolerance: relative tolerance for numeric answers (the recipe's reward_tolerance).
        row: every column of the training row (context, target and any extra ones).
    """

    completion: str
    target: str
    prompt: str = ""
    finished: bool = True
    token_ids: tuple[int, ...] = ()
    labels: tuple[str, ...] = ()
    tolerance: float = 0.01
    row: dict = field(default_factory=dict)

    @property
    def answer(self) -> str:
        """The completion's answer: the text after its last "Answer:" (all of it when there is none), stripped."""
        return parsing.answer_text(self.completion)


class RewardError(UserError):
    """A reward function raised, or returned a value that is not a finite number (nor None): the run stops."""


RewardFunction = Callable[[Sample], "float | None"]
REWARDS: dict[str, RewardFunction] = {}


def register_reward(name: str) -> Callable[[RewardFunction], RewardFunction]:
    """Decorator: make `fn(sample) -> float | None` available to recipes as `name`.

    Raises:
        ValueError: when `name` is already taken by another function (a programming error, not a user's).
    """

    def add(function: RewardFunction) -> RewardFunction:
        if name in REWARDS and REWARDS[name] is not function:
            raise ValueError(f'reward "{name}" is already registered (by {REWARDS[name].__qualname__}).')
        REWARDS[name] = function
        return function

    return add


def reward_names() -> list[str]:
    return sorted(REWARDS)


@register_reward("exact_match")
def exact_match(sample: Sample) -> float:
    """1 when the answer is exactly the target (case, spacing and a final full stop forgiven), else 0.

    The strict reward for classification labels: "positive" scores, "The sentiment is positive." does not.
    """
    return float(parsing.normalise_text(sample.answer) == parsing.normalise_text(sample.target))


@register_reward("label_match")
def label_match(sample: Sample) -> float | None:
    """1 when the first label the answer mentions is the target's (the eval harness's generate-mode rule), else 0.

    Lenient: "The sentiment is positive." scores. Abstains (None) when the task has no inferred label set.
    """
    if not sample.labels:
        return None
    return float(parsing.match_label(sample.answer, sample.labels) == parsing.match_label(sample.target, sample.labels))


def _numeric_reward(sample: Sample, score) -> float | None:
    """The rule every numeric reward shares: abstain (None) when the target holds no number, 0 when the answer has
    none, else `score(target, answer)` of the two numbers (the target's, the answer's first)."""
    target = parsing.parse_number(sample.target)
    if target is None:
        return None
    answer = parsing.parse_number(sample.answer)
    return 0.0 if answer is None else float(score(target, answer))


@register_reward("numeric_match")
def numeric_match(sample: Sample) -> float | None:
    """1 when the answer's first number is within `tolerance` (relative) of the target's number, else 0.

    Abstains (None) on a row whose target holds no number.
    """
    return _numeric_reward(sample, lambda target, answer:
                           abs(answer - target) <= max(sample.tolerance * abs(target), NUMERIC_ABS_TOLERANCE))


@register_reward("exact_number")
def exact_number(sample: Sample) -> float | None:
    """1 when the answer's first number equals the target's number exactly, else 0: the arith eval task's rule
    (eval/tasks.json "arith": exact match of the first number). Abstains (None) on a target without a number."""
    return _numeric_reward(sample, lambda target, answer: answer == target)


@register_reward("numeric_closeness")
def numeric_closeness(sample: Sample) -> float | None:
    """Partial credit by relative error: 1 - |answer - target| / max(|target|, 1), floored at 0 (0 without a number).

    Dense where exact_number is all-or-nothing, so that a group whose answers are all wrong still has a spread
    (an answer off by 1 beats one off by 30). Weigh it well below the exact reward (e.g. 0.1 next to 1.0): a
    policy must never gain more by being close on many rows than by being right on one. Abstains on a target
    without a number.
    """
    return _numeric_reward(sample, lambda target, answer: max(0.0, 1.0 - abs(answer - target) / max(abs(target), 1.0)))


@register_reward("format")
def answer_format(sample: Sample) -> float:
    """1 for a bare answer: the model ended it itself, on one line, with nothing but the answer; else 0.

    "Nothing but the answer" means: for a labelled task, the answer is one of the labels; otherwise it is
    non-empty and has no line break. Pair it with a correctness reward at a small weight.
    """
    answer = sample.answer
    if not sample.finished or not answer or "\n" in answer:
        return 0.0
    if sample.labels:
        return float(parsing.normalise_text(answer) in {parsing.normalise_text(label) for label in sample.labels})
    return 1.0


def infer_labels(targets: list[str]) -> tuple[str, ...]:
    """The distinct targets when there are few of them (a classification task), else () (free-form answers)."""
    distinct = sorted({target.strip() for target in targets})
    return tuple(distinct) if 1 < len(distinct) <= MAX_INFERRED_LABELS else ()


def completion_text(completion) -> str:
    """TRL hands plain-text completions as strings and chat completions as [{"role": ..., "content": ...}]."""
    if isinstance(completion, str):
        return completion
    return "".join(message.get("content") or "" for message in completion)


def build_trl_reward(name: str, *, labels: tuple[str, ...], tolerance: float, end_token_ids: set[int]):
    """A batch reward callable in TRL's calling convention around the registered per-sample function `name`.

    The callable's `__name__` is `name`, so TRL logs it as `rewards/<name>/mean`.

    Raises (from the callable):
        RewardError: the function raised, or returned something other than a finite number or None; the message
            names the reward, what it returned or raised, and the completion and target it was scoring.
    """
    function = REWARDS[name]

    def reward(prompts, completions, completion_ids, **columns):
        rows = [
            {key: values[i] for key, values in columns.items() if isinstance(values, list)}
            for i in range(len(completions))
        ]
        scores = []
        for prompt, completion, ids, row in zip(prompts, completions, completion_ids, rows):
            sample = Sample(
                completion=completion_text(completion),
                target=str(row.get("target", "")),
                prompt=completion_text(prompt),
                finished=bool(ids) and ids[-1] in end_token_ids,
                token_ids=tuple(ids),
                labels=labels,
                tolerance=tolerance,
                row=row,
            )
            scores.append(checked_score(name, function, sample))
        return scores

    reward.__name__ = name
    reward.__qualname__ = name
    return reward


def checked_score(name: str, function: RewardFunction, sample: Sample) -> float | None:
    """`function(sample)` as a float (or None), or a RewardError: a NaN or an infinity would otherwise flow into
    the advantages silently (TRL reads NaN as "abstain" and averages around it), and an exception deep inside the
    trainer would not say which reward or which completion caused it."""
    where = f"while scoring the completion {sample.completion[:80]!r} (target {sample.target!r})"
    try:
        score = function(sample)
    except Exception as error:  # noqa: BLE001 - any failure of user code stops the run, named
        raise RewardError(f'reward "{name}" raised {type(error).__name__}: {error} {where}. The run stops: fix '
                          f"the reward function ({function.__module__}.{function.__qualname__}).") from error
    if score is None:
        return None
    try:
        value = float(score)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):
        raise RewardError(f'reward "{name}" returned {score!r} {where}; a reward must be a finite number, or None '
                          f"to abstain. The run stops: fix the reward function "
                          f"({function.__module__}.{function.__qualname__}).")
    return value
