"""`fedtext generate`: sample text from a model, streamed as it comes (nanoGPT's sample.py)."""

from __future__ import annotations

import secrets
import sys

from fedtext.errors import FedtextError


def register(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a model, streamed as it comes",
                       description="Sample characters one at a time, carrying the recurrent "
                       "state; the same --seed gives the same text.")
    p.add_argument("--model", required=True, help="'pretrained', a checkpoint directory or a "
                   "run directory")
    p.add_argument("--prompt", required=True, help="text to start from")
    p.add_argument("--length", type=int, default=200, help="characters to generate (default "
                   "200, the tutorial's)")
    p.add_argument("--temperature", type=float, default=1.0, help="< 1 safer, > 1 wilder, "
                   "0 greedy (default 1.0)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest characters only")
    p.add_argument("--seed", type=int, help="random seed (default: fresh each run); sample i "
                   "uses seed + i")
    p.add_argument("--num-samples", type=int, default=1, help="how many samples (default 1)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.set_defaults(func=generate_cmd)


def generate_cmd(args) -> int:
    from fedtext.cli.evaluate import load_model
    from fedtext.model.generate import check_sampling, stream_text

    check_sampling(args.length, args.temperature, args.top_k)
    if not args.prompt:
        raise FedtextError("the prompt is empty: give the model at least one character to "
                           "start from (e.g. --prompt 'ROMEO:')")
    if args.num_samples < 1:
        raise FedtextError(f"--num-samples must be >= 1, not {args.num_samples}")
    if args.seed is not None and args.seed < 0:
        raise FedtextError(f"--seed must be >= 0, not {args.seed}")
    model, vocab, _ = load_model(args.model, args.device)
    seed = args.seed if args.seed is not None else secrets.randbits(31)
    for i in range(args.num_samples):
        text = stream_text(model, args.prompt, args.length, args.temperature, args.top_k,
                           seed + i, vocab)
        if i:
            sys.stdout.write("\n---\n")
        first = next(text, "")  # checks the prompt before anything is printed
        sys.stdout.write(args.prompt + first)
        for ch in text:
            sys.stdout.write(ch)
            sys.stdout.flush()  # stream: each character shows as soon as it is sampled
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
