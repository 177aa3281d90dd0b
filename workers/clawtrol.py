"""ClawTrol's outcome payload v1: one model for an agent's outcome line and the HTTP hook.

An agent that prints the payload as its last stdout line (:mod:`workers.agent_output`) and a client that posts
it to ``POST /api/v1/hooks/task_outcome`` (``clawq serve``) are judged by the same rules, here.

Values are read the way ClawTrol (Rails) reads its params, so a form field or a JSON value both pass:

- ``version`` is compared as text: ``"1"`` and ``1`` are version 1;
- ``task_id`` is an integer or its decimal text;
- ``run_id`` is a UUID in either case (kept in lower case, the form clawq hands out);
- ``needs_follow_up`` is a boolean, or one of the words true/false, 1/0, t/f, yes/no, y/n, on/off
  (any case); empty means not given;
- ``recommended_action`` is ``in_review`` (also when empty or absent), ``requeue_same_task``,
  ``prompt_user`` or ``split_into_subtasks``.

Only ``requeue_same_task`` puts the task back on its board, unless ``needs_follow_up`` is false; it then
needs a non-blank ``next_prompt``. Every other action sends the task to review. Fields this model does not
name (``ended_at``, ``openclaw_session_*``, ``run``, ``tokens``, ``usage`` …) are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from clawq.broker import Outcome
from clawq.broker.checks import MAX_TASK_ID, run_id_problem

__all__ = ["ACTIONS", "Action", "OutcomeV1", "rails_bool"]

#: The values of ``recommended_action``; only ``requeue_same_task`` can put the task back on its board.
Action = Literal["in_review", "requeue_same_task", "prompt_user", "split_into_subtasks"]
ACTIONS: tuple[str, ...] = get_args(Action)
_TRUE = frozenset({"true", "t", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "f", "0", "no", "n", "off"})


def _as_text(value: Any) -> Any:
    """A number as its decimal text (Rails compares the version as text); anything else unchanged."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def _version(value: Any) -> str:
    text = _as_text(value)
    if text != "1":
        raise ValueError(f"invalid version {str(value)[:40]!r}: this server speaks outcome payload version 1")
    return "1"


def _task_id(value: Any) -> Any:
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        return int(value.strip())
    return value


def _run_id(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    if run_id_problem(value.lower()) is not None:
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise ValueError(f"invalid run_id {shown!r}: a UUID in 8-4-4-4-12 form (any case)")
    return value.lower()


def rails_bool(value: Any) -> bool | None:
    """A boolean as Rails params carry it (see the module docstring); None for empty; ValueError otherwise."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if not word:
            return None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
    raise ValueError(f"not a boolean: {str(value)[:40]!r} (use true/false, 1/0, t/f, yes/no or on/off)")


def _action(value: Any) -> Any:
    if value is None or value == "":
        return "in_review"
    if value not in ACTIONS:
        raise ValueError(f"invalid recommended_action {str(value)[:40]!r}: one of {', '.join(ACTIONS)}")
    return value


TextList = list[str] | str | None


class OutcomeV1(BaseModel):
    """ClawTrol's outcome payload v1 (see the module docstring for how values are read)."""

    model_config = ConfigDict(strict=True, extra="ignore", title="OutcomePayloadV1")

    version: Annotated[str, BeforeValidator(_version, json_schema_input_type=str | int)] = Field(
        description='"1" (the number 1 is the same)')
    task_id: Annotated[int, BeforeValidator(_task_id), Field(ge=1, lt=MAX_TASK_ID)] = Field(
        description="The task id (its decimal text is the same).")
    run_id: Annotated[str, BeforeValidator(_run_id)] = Field(
        description="The run id the claim handed out (any case).")
    needs_follow_up: Annotated[bool | None, BeforeValidator(rails_bool, json_schema_input_type=bool | str | int | None)
                               ] = Field(None, description="A boolean or true/false, 1/0, t/f, yes/no, on/off; "
                                                           "false keeps requeue_same_task from requeueing.")
    recommended_action: Annotated[Action, BeforeValidator(_action, json_schema_input_type=Action | None)] = Field(
        "in_review", description="Only requeue_same_task puts the task back on its board (with next_prompt).")
    next_prompt: str | None = None
    summary: str | None = None
    achieved: TextList = None
    evidence: TextList = None
    remaining: TextList = None
    model_used: str | None = None

    @model_validator(mode="after")
    def _rules(self) -> OutcomeV1:
        if self.follow_up and not (self.next_prompt or "").strip():
            raise ValueError("next_prompt is required for requeue_same_task")
        try:
            self.outcome()
        except ValidationError as err:
            first = err.errors()[0]
            raise ValueError(str(first["msg"]).removeprefix("Value error, ")) from None
        return self

    @property
    def follow_up(self) -> bool:
        """Whether the same task goes back on its board: ``requeue_same_task``, unless needs_follow_up is false."""
        return self.recommended_action == "requeue_same_task" and self.needs_follow_up is not False

    def outcome(self) -> Outcome:
        """The broker's outcome: built the same way for every encoding, so a repeat has the same digest."""
        fields = {
            "needs_follow_up": self.follow_up,
            "next_prompt": self.next_prompt,
            "summary": self.summary,
            "achieved": self.achieved,
            "evidence": self.evidence,
            "remaining": self.remaining,
            "model_used": self.model_used,
        }
        return Outcome.model_validate({k: v for k, v in fields.items() if v is not None})
