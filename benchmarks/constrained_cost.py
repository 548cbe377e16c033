"""What JSON-Schema constraint costs per decoded token, next to a decode step.

    python benchmarks/constrained_cost.py [--layers 2] [--tokens 16] [--no-model]

1. `constraint_cost`: replay a whole structured turn (analysis header, reasoning, final header,
   a realistic answer) through the processor bound to the loop's parser, per token and per
   phase: forced header tokens, free analysis text (the text-only mask), the JSON answer
   (llguidance's mask and the MLX masking).
2. The generation loop on the 20b-width synthetic model (`mlx_gptoss.benchmark`'s cached
   checkpoint): ms per token with the constraint writing the whole turn from
   `<|start|>assistant` (nothing forced, a reasoning budget of half the tokens), with a
   do-nothing processor (the same unpipelined loop), and with no processor (pipelined), so
   the constraint's own share and the cost of giving up pipelining are both visible.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

from mlx_gptoss.benchmark import Settings, synthetic_checkpoint
from mlx_gptoss.constrained import JsonSchemaConstraint, constraint_cost
from mlx_gptoss.generate import generate_tokens
from mlx_gptoss.harmony import Message, Role, load_tokenizer, render_conversation_for_completion
from mlx_gptoss.loading import load_model
from mlx_gptoss.sampling import SamplingParams, make_sampler

SCHEMA = {
    "type": "object", "additionalProperties": False,
    "required": ["order_id", "customer", "items", "status"],
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "customer": {"type": "object", "required": ["name", "email"],
                     "properties": {"name": {"type": "string"}, "email": {"type": "string"},
                                    "vip": {"type": "boolean"}}},
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["sku", "quantity", "price"],
            "properties": {"sku": {"type": "string"},
                           "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                           "price": {"type": "number", "minimum": 0}}}},
        "status": {"enum": ["pending", "shipped", "delivered"]},
        "notes": {"type": "string"},
    },
}
DOCUMENT = json.dumps({
    "order_id": "ORD-004217",
    "customer": {"name": "Ada Lovelace", "email": "ada@example.org", "vip": True},
    "items": [{"sku": "MX-2880-A", "quantity": 2, "price": 19.99},
              {"sku": "GPT-OSS-20B", "quantity": 1, "price": 0}],
    "status": "shipped",
    "notes": "Leave the parcel at the reception desk, please; the office opens at nine.",
})


def decode_ms(model, prompt: list[int], tokens: int, processors) -> float:
    """ms per generated token (first token excluded: it pays for the prefill)."""
    sampler = make_sampler(SamplingParams(seed=0))
    stamps = []
    for _ in generate_tokens(model, prompt, sampler=sampler, max_tokens=tokens + 1,
                             logits_processors=processors):
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-model", action="store_true", help="only the constraint's own cost")
    args = parser.parse_args()

    tok = load_tokenizer()
    cost = constraint_cost(tok, SCHEMA, DOCUMENT, repeats=args.repeats)
    for phase, c in cost["phases"].items():
        print(f"constraint alone, {phase}: {c['tokens']} tokens, mean {c['mean_ms']:.3f} ms, "
              f"median {c['median_ms']:.3f} ms, p90 {c['p90_ms']:.3f} ms, max {c['max_ms']:.3f} ms")
    if args.no_model:
        return

    path = synthetic_checkpoint(Settings(layers=args.layers))
    model, _ = load_model(path, args.dtype)
    constraint = JsonSchemaConstraint.from_schema(tok, SCHEMA, max_reasoning_tokens=args.tokens // 2)
    prompt = render_conversation_for_completion(
        [Message.from_role_and_content(Role.USER, "Show my order.")], Role.ASSISTANT, None, tok)
    runs = {"pipelined": lambda: [], "do-nothing processor": lambda: [lambda tokens, logits: logits],
            "constrained": lambda: [constraint.processor(prompt)]}
    decode_ms(model, prompt, 2, [])  # warm up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):  # alternated, so machine noise hits all three
        for name, processors in runs.items():
            times[name].append(decode_ms(model, prompt, args.tokens, processors()))
    summary = ", ".join(f"{name} {statistics.median(t):.1f} ms" for name, t in times.items())
    print(f"decode step, {args.layers}-layer 20b-width model ({args.dtype}), median of "
          f"{args.repeats}: {summary}")


if __name__ == "__main__":
    main()
