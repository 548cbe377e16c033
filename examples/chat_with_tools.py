"""A chat whose model can call a Python function: its schema comes from the type hints and the
docstring, calls run automatically, and results go back to the model until it answers.

    python examples/chat_with_tools.py [MODEL]
"""
import os
import sys

from mlx_gptoss import Chat, load


def get_weather(location: str, unit: str = "celsius") -> dict:
    """Get the current weather in a city.

    Args:
        location: The city name, e.g. Paris.
        unit: "celsius" or "fahrenheit".
    """
    return {"location": location, "temperature": 21, "unit": unit, "sky": "sunny"}


model_name = sys.argv[1] if len(sys.argv) > 1 else "openai/gpt-oss-20b"
model, tokenizer = load(model_name)
chat = Chat(model, tokenizer, tools=[get_weather], reasoning_effort="low",
            instructions="Answer briefly.",
            max_tokens=int(os.environ.get("EXAMPLE_MAX_TOKENS", "1024")))
for question in ["What's the weather in Paris?", "And in Tokyo, in fahrenheit?"]:
    reply = chat.send(question)
    for call in reply.tool_calls:
        print(f"(called {call.recipient} with {call.text()})")
    print(f"> {question}\n{reply.text or '[no final answer: ' + reply.stop + ']'}\n")
    print(f"[{reply.generations[-1].stats.summary()}]\n")
