"""``pdserve generate``: offline generation with the engine, no server.

Heavy imports (torch) happen in ``run`` so that building the ``pdserve``
parser for other subcommands stays fast.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--preset", default="tiny", help="built-in model: tiny or small")
    src.add_argument("--model-dir", help="Hugging Face checkpoint directory")
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cpu", help="cpu, cuda:N or npu:N")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    import torch

    from pdserve.engine.batcher import generate
    from pdserve.engine.engine import LLMEngine
    from pdserve.engine.sampling import SamplingParams
    from pdserve.errors import PdserveError

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
        )
        engine = LLMEngine.load(args.model_dir or args.preset, dtype=args.dtype,
                                device=args.device)
        prompt_ids = engine.tokenizer.encode(args.prompt)
        (output,) = generate(engine, [prompt_ids], params, max_batch_size=1)
    except PdserveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(engine.tokenizer.decode(output))
    return 0
