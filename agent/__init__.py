"""How the LLM agent sees a state and answers: prompt rendering and action parsing."""
from agent.prompt import (CHAT_DATE, SYSTEM_PROMPT, AgentState, Turn, command_to_send, format_response,
                          parse_action, render_messages, render_prompt, steer_prompt)

__all__ = ["CHAT_DATE", "AgentState", "Turn", "SYSTEM_PROMPT", "render_messages", "render_prompt", "format_response",
           "parse_action", "command_to_send", "steer_prompt"]
