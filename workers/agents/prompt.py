"""The prompt a CLI gets: the task's title, prompt and accumulated context, and the instruction to end with a
``clawq-outcome`` block. A follow-up that resumes the CLI's own session gets only the next prompt.

``agents.<model>.prompt_template`` names a file that replaces the fresh-run template. It is a
:class:`string.Template`: ``$title``, ``$prompt``, ``$context``, ``$next_prompt``, ``$outcome_instructions``,
``$task_id``, ``$board`` and ``$run_count`` are substituted; anything else is left as written.
"""

from __future__ import annotations

from string import Template
from typing import Any

__all__ = ["OUTCOME_INSTRUCTIONS", "render_prompt", "render_resume"]

OUTCOME_INSTRUCTIONS = """When you are done, end your answer with this fenced block (one JSON object):

```clawq-outcome
{"needs_follow_up": false, "next_prompt": "", "summary": "what you did, in one or two sentences"}
```

Set "needs_follow_up" to true and write the next instruction in "next_prompt" when the task needs another run."""

DEFAULT_TEMPLATE = "$title\n\n$prompt\n\n$context$outcome_instructions\n"


def _context(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return ""
    lines = ["Work done on this task so far (earlier runs):"]
    for entry in entries:
        lines.append(f"- Run {entry.get('run_count', '?')} ({entry.get('model', '?')}): {entry.get('summary', '')}")
        if entry.get("next_prompt"):
            lines.append(f"  Next step asked: {entry['next_prompt']}")
    last = str(entries[-1].get("next_prompt") or "")
    if last:
        lines += ["", f"Now: {last}"]
    return "\n".join(lines) + "\n\n"


def render_prompt(task: dict[str, Any], template: str | None = None) -> str:
    """The prompt of a fresh run (no session to resume): everything the agent needs to start or continue."""
    context = list(task.get("context") or [])
    values = {
        "title": str(task.get("title", "")), "prompt": str(task.get("prompt", "")),
        "context": _context(context), "next_prompt": str(context[-1].get("next_prompt") or "") if context else "",
        "outcome_instructions": OUTCOME_INSTRUCTIONS, "task_id": str(task.get("task_id", "")),
        "board": str(task.get("board", "")), "run_count": str(task.get("run_count", "")),
    }
    text = Template(template or DEFAULT_TEMPLATE).safe_substitute(values)
    return "\n".join(line.rstrip() for line in text.strip().splitlines()).replace("\n\n\n", "\n\n") + "\n"


def render_resume(next_prompt: str) -> str:
    """The prompt of a follow-up that resumes the previous run's session: only the next step."""
    return f"{next_prompt.strip()}\n\n{OUTCOME_INSTRUCTIONS}\n"
