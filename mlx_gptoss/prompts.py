"""Harmony prompts from plain arguments: the system message (identity, effort, date, built-in
tools), the developer message (instructions, function tools, response format), a one-turn
conversation for a user string, and `render_prompt`, which turns any prompt form (text,
messages, a conversation, token ids) into the ids the model reads.
"""
from __future__ import annotations

from typing import Sequence, Union

from .errors import GptOssError
from .harmony import (
    Conversation,
    DeveloperContent,
    HarmonyTokenizer,
    Message,
    ReasoningEffort,
    RenderConversationConfig,
    ResponseFormat,
    Role,
    SystemContent,
    ToolDescription,
    render_conversation_for_completion,
)

Prompt = Union[str, Conversation, Sequence[Message], Sequence[int]]



def parse_effort(effort: str | ReasoningEffort | None) -> ReasoningEffort | None:
    if effort is None or isinstance(effort, ReasoningEffort):
        return effort
    for value in ReasoningEffort:
        if str(effort).lower() == value.value.lower():
            return value
    raise GptOssError(f"unknown reasoning effort {effort!r} (expected low, medium or high)")


def system_message(*, reasoning_effort: str | ReasoningEffort | None = ReasoningEffort.MEDIUM,
                   identity: str | None = None, date: str | None = None,
                   python_tool: bool = False) -> Message:
    """The harmony system message: identity, effort, optional date and built-in python tool."""
    content = SystemContent()
    content.reasoning_effort = parse_effort(reasoning_effort)
    if identity is not None:
        content.model_identity = identity
    if date is not None:
        content.conversation_start_date = date
    if python_tool:
        content.with_python_tool()
    return Message.from_role_and_content(Role.SYSTEM, content)


def developer_message(instructions: str | None = None,
                      functions: Sequence[ToolDescription] = (),
                      response_format: ResponseFormat | None = None) -> Message | None:
    """The developer message (instructions, function tools, response format), or None when it
    would be empty."""
    if instructions is None and not functions and response_format is None:
        return None
    content = DeveloperContent(instructions=instructions)
    if functions:
        content.with_function_tools(list(functions))
    if response_format is not None:
        content.with_response_format(response_format)
    return Message.from_role_and_content(Role.DEVELOPER, content)


def prompt_messages(user: str, *, reasoning_effort: str | ReasoningEffort | None = "medium",
                    system: str | None = None, developer: str | None = None,
                    functions: Sequence[ToolDescription] = (), python_tool: bool = False,
                    date: str | None = None,
                    response_format: ResponseFormat | None = None) -> list[Message]:
    """system, optional developer, user: a one-turn conversation for `user`."""
    messages = [system_message(reasoning_effort=reasoning_effort, identity=system, date=date,
                               python_tool=python_tool)]
    dev = developer_message(developer, functions, response_format)
    if dev is not None:
        messages.append(dev)
    messages.append(Message.from_role_and_content(Role.USER, user))
    return messages


# What `prompt_messages` takes: the keywords a text prompt accepts everywhere (generate,
# stream_generate, batch_generate, Engine.stream_generate).
PROMPT_OPTIONS = ("reasoning_effort", "system", "developer", "functions", "python_tool", "date",
                  "response_format")


def render_prompt(prompt: Prompt, tokenizer: HarmonyTokenizer,
                  config: RenderConversationConfig | None = None, **prompt_options) -> list[int]:
    """Token ids for `prompt`: a user string (see `prompt_messages`), messages, or ids."""
    unknown = sorted(set(prompt_options) - set(PROMPT_OPTIONS))
    if unknown:
        raise TypeError(f"unknown generation option(s) {', '.join(unknown)}; the prompt options "
                        f"are {', '.join(PROMPT_OPTIONS)}")
    if isinstance(prompt, str):
        prompt = prompt_messages(prompt, **prompt_options)
    elif prompt_options:
        raise GptOssError(f"{', '.join(sorted(prompt_options))} only apply to a text prompt")
    if hasattr(prompt, "tolist"):  # numpy or MLX arrays of ids
        prompt = prompt.tolist()
    if isinstance(prompt, Conversation) or (
            isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], Message)):
        return render_conversation_for_completion(prompt, Role.ASSISTANT, config, tokenizer)
    ids = tokenizer.check_ids(prompt)
    if not ids:
        raise GptOssError("the prompt is empty")
    return ids
