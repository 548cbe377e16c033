"""Names that many modules spell: harmony's channels, and the reasons a message, a generation
or a chat turn stopped. Defined once so that a typo is an import error, not a silent branch
that never runs. The values are the strings the public API (and `--json` events) carry.
"""
from __future__ import annotations

# The channels gpt-oss writes, in the order a system message declares them.
ANALYSIS = "analysis"  # chain of thought: not for the user, not safety-trained like final
COMMENTARY = "commentary"  # tool calls, and preambles shown to the user
FINAL = "final"  # the answer
CHANNELS = (ANALYSIS, COMMENTARY, FINAL)

# Why a message ended (`MessageEnd.stop`): the control token that closed it, ...
STOP_END = "end"
STOP_RETURN = "return"  # <|return|>: the answer is complete
STOP_CALL = "call"  # <|call|>: a tool must run
# ... or the tokens ran out mid-message (a generation cut by max_tokens, a truncated file):
STOP_STREAM_END = "stream_end"
STOP_RECOVERED = "recovered"  # the lenient parser closed it to repair broken structure

# Why a generation ended (`GenerationResult.stop`): STOP_RETURN, STOP_CALL, or
STOP_ENDOFTEXT = "eos"  # <|endoftext|>, the checkpoint's other eos token
STOP_LENGTH = "length"  # max_tokens reached

# Why a chat turn ended (`Reply.stop`): any generation stop, or
STOP_TOOL_ROUNDS = "tool_rounds"  # max_tool_rounds tool calls answered, and the model called again
STOP_INVALID_CALL = "invalid_call"  # <|call|> closed a message that names no recipient
