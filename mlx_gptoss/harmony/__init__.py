"""Harmony, gpt-oss's chat format: tokenizer, data model, renderer and streaming parser.

Token-exact with openai-harmony 0.0.8 (the test oracle), built on tiktoken alone.
"""
from .messages import (
    Author,
    ChannelConfig,
    Content,
    Conversation,
    DeveloperContent,
    Message,
    ReasoningEffort,
    ResponseFormat,
    Role,
    SystemContent,
    TextContent,
    ToolDescription,
    ToolNamespaceConfig,
    validate_conversation,
    validate_message,
)
from .parser import (
    AnswerDone,
    Event,
    MessageEnd,
    MessageStart,
    Recovery,
    State,
    StreamParser,
    TextDelta,
    ToolCall,
    parse_messages,
    parser_after,
)
from .render import (
    RenderConversationConfig,
    RenderedExample,
    developer_text,
    dropped_analysis,
    render_conversation,
    render_conversation_for_completion,
    render_conversation_for_training,
    render_for_training,
    render_message,
    system_text,
)
from .tokenizer import (
    VOCAB_FILENAME,
    VOCAB_SHA256,
    HarmonyTokenizer,
    copy_vocabulary,
    find_vocabulary,
    load_tokenizer,
)
from .typescript import schema_to_typescript

__all__ = [
    "AnswerDone", "Author", "ChannelConfig", "Content", "Conversation", "DeveloperContent",
    "Event", "HarmonyTokenizer", "Message", "MessageEnd", "MessageStart", "ReasoningEffort",
    "Recovery", "RenderConversationConfig", "RenderedExample", "ResponseFormat", "Role", "State", "StreamParser",
    "SystemContent", "TextContent", "TextDelta", "ToolCall", "ToolDescription",
    "ToolNamespaceConfig", "VOCAB_FILENAME", "VOCAB_SHA256", "copy_vocabulary",
    "developer_text", "dropped_analysis", "find_vocabulary", "load_tokenizer", "parse_messages",
    "parser_after",
    "render_conversation", "render_conversation_for_completion",
    "render_conversation_for_training", "render_for_training", "render_message", "schema_to_typescript", "system_text",
    "validate_conversation", "validate_message",
]
