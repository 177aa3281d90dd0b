"""Adapters for real coding-agent CLIs: Claude Code, Codex, Gemini CLI, OpenClaw, opencode and aider.

:data:`PRESETS` maps a config preset name (``agents.<model>.preset``) to its adapter. The runner that uses
them is :mod:`workers.agents.runner`.
"""

from __future__ import annotations

from .aider import Aider
from .base import Adapter, Invocation, Launch, Native, Usage, interpret, outcome_from_text
from .claude import ClaudeCode
from .codex import Codex
from .gemini import GeminiCli
from .openclaw import OpenClaw
from .opencode import OpenCode
from .prompt import OUTCOME_INSTRUCTIONS, render_prompt, render_resume

__all__ = [
    "OUTCOME_INSTRUCTIONS",
    "PRESETS",
    "Adapter",
    "Invocation",
    "Launch",
    "Native",
    "Usage",
    "interpret",
    "outcome_from_text",
    "render_prompt",
    "render_resume",
]

PRESETS: dict[str, Adapter] = {
    a.preset: a for a in (ClaudeCode(), Codex(), GeminiCli(), OpenClaw(), OpenCode(), Aider())
}
