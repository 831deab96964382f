"""`kltd make-data`: write a JSONL dataset of responses sampled from a model (or a mixture of two).

    kltd make-data --out data/student_t1.jsonl --model toy/student --n 5000 --temperature 1.0
    kltd make-data --out data/mix.jsonl --model toy/student --other toy/teacher --other-fraction 0.3

Prompts come from the built-in task's training split (same data seed as `kltd train`), so the file
can replace the task's correct responses: `kltd train trajectory=dataset data.responses_file=FILE`.
"""

from __future__ import annotations

import argparse
import sys

import torch

from kltd.data.responses_file import ResponseRow, write_responses


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kltd make-data", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the JSONL file to write")
    p.add_argument("--model", default="toy/student", help="model that writes the responses (default toy/student)")
    p.add_argument("--other", default="toy/teacher", help="second model of a mixture (default toy/teacher)")
    p.add_argument("--other-fraction", type=float, default=0.0, help="per-row probability of using --other")
    p.add_argument("--n", type=int, default=5000, help="number of rows (at most data.n_train prompts)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--data-seed", type=int, default=0, help="the task's data.seed")
    p.add_argument("--n-train", type=int, default=20000, help="the task's data.n_train")
    p.add_argument("--n-eval", type=int, default=500, help="the task's data.n_eval")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if not 0.0 <= args.other_fraction <= 1.0:
        p.error("--other-fraction must lie in [0, 1]")
    if args.n < 1 or args.n > args.n_train:
        p.error(f"--n must lie in [1, --n-train={args.n_train}]")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("--temperature must be >= 0 and --top-p in (0, 1]")
    return args


def generate_rows(args, echo=print) -> list[ResponseRow]:
    from kltd.train.models import check_model_reference, load_model, load_tokenizer, pick_device
    from kltd.rollout.batch import decode_responses, encode_prompts
    from kltd.rollout.sampling import Sampler
    from kltd.data.addition import is_correct, make_splits

    names = {"model": args.model, **({"other": args.other} if args.other_fraction > 0 else {})}
    for flag, ref in names.items():
        problem = check_model_reference(ref)
        if problem:
            raise ValueError(f"--{flag}: {problem}")
    device = pick_device(args.device)
    tokenizer = load_tokenizer(args.model)
    samplers = {role: Sampler(load_model(ref, device=device).eval(), tokenizer, args.max_new_tokens, args.temperature,
                              args.top_p) for role, ref in names.items()}
    train, _ = make_splits(args.data_seed, args.n_train, args.n_eval)
    examples = train[: args.n]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    coins = torch.rand(len(examples), generator=torch.Generator().manual_seed(args.seed)) < args.other_fraction
    rows: list[ResponseRow | None] = [None] * len(examples)
    for role, chosen in (("model", ~coins), ("other", coins)):
        idx = chosen.nonzero().squeeze(1).tolist()
        for start in range(0, len(idx), args.batch_size):
            part = idx[start : start + args.batch_size]
            ids, mask = encode_prompts(tokenizer, [examples[i].prompt for i in part], device)
            texts = decode_responses(tokenizer, samplers[role](ids, mask, generator))
            for i, text in zip(part, texts):
                rows[i] = ResponseRow(examples[i], text, names[role])
    correct = sum(is_correct(r.response, r.example) for r in rows)
    echo(f"{len(rows)} responses, {correct / len(rows):.1%} correct")
    return rows


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    try:
        rows = generate_rows(args)
    except (ValueError, OSError) as error:
        print(f"kltd: error: {error}", file=sys.stderr)
        sys.exit(2)
    write_responses(args.out, rows)
    print(f"wrote {args.out}")
