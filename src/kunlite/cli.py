"""python -m kunlite generate PROMPT [--chat] [--max-tokens N] [--temperature T] [--stream]"""

from __future__ import annotations

import argparse
import sys

from kunlite.config import ConfigError
from kunlite.engine.args import add_engine_args, options_from_args
from kunlite.sampling_params import SamplingParams, SamplingParamsError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m kunlite generate",
                                     description="Generate text from a prompt on the default (or given) model.")
    parser.add_argument("prompt")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    add_engine_args(parser)
    args = parser.parse_args(argv)

    from kunlite.llm import LLM

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed).validate()
        opts = options_from_args(args)
        llm = LLM(**{k: v for k, v in vars(opts).items()})  # checks the cluster flags first
    except (ConfigError, SamplingParamsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    prompt: str | list[int] = args.prompt
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
            [{"role": "user", "content": args.prompt}]
        text = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        prompt = llm.tokenizer.encode(text, add_special_tokens=False)
    with llm:
        if args.stream:
            for delta in llm.stream(prompt, params):
                print(delta.text, end="", flush=True)
            print()
        else:
            print(llm.generate([prompt], params)[0].outputs[0].text)
    return 0
