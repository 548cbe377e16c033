"""Structured output: the final answer is JSON that validates against a schema by construction.

The schema goes into the developer message (so the model knows it) and a logits processor
writes the assistant's turn: a well-formed header, free reasoning closed in time for the
answer to fit in max_tokens, then the final message's JSON, masking every token that would
break it.

    python examples/structured_output.py [MODEL]
"""
import json
import os
import sys

from mlx_gptoss import Message, Role, generate, load
from mlx_gptoss.constrained import JsonSchemaConstraint
from mlx_gptoss.prompts import developer_message, system_message

schema = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "country": {"type": "string"},
                   "population_millions": {"type": "number"}},
    "required": ["city", "country", "population_millions"],
    "additionalProperties": False,
}

model_name = sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b"
model, tokenizer = load(model_name)
constraint = JsonSchemaConstraint.from_schema(tokenizer, schema, name="city_facts")
developer = developer_message("Answer with facts about the city the user names.")
developer.content[0].with_response_format(constraint.response_format)
messages = [system_message(reasoning_effort="low"), developer,
            Message.from_role_and_content(Role.USER, "Tell me about Lyon.")]
max_tokens = int(os.environ.get("EXAMPLE_MAX_TOKENS", "1024"))
processor = constraint.processor(max_tokens=max_tokens)
result = generate(model, tokenizer, messages, logits_processors=[processor], max_tokens=max_tokens)
if processor.json_complete:
    print(json.dumps(json.loads(result.text), indent=2))
else:  # max_tokens reached before the JSON closed: the JSON so far is a valid prefix
    print(f"no complete answer (stop: {result.stop}); final so far: {result.text!r}")
