"""Train the shipped toy teacher and student initialisation for the built-in addition task.

    python scripts/make_toy_models.py            # writes kltd/assets/toy/{teacher,student,calibration.json}
    python scripts/make_toy_models.py --check    # regenerate into a temp dir; compare weight sha256s

Both models are plain Hugging Face `LlamaForCausalLM`s trained by teacher-forced cross-entropy on
prompt + response + EOS (loss on response + EOS only), in the layout the kltd trainer uses: prompts
left-padded, responses right-padded, position ids counted from the attention mask.

- teacher: 3 layers x 128, trained to near-perfect greedy accuracy on the held-out split.
- student: 2 layers x 64, the same SFT stopped early (constant learning rate after a short warmup) so
  that it is clearly weaker (30-60% greedy accuracy) but still learning: a warm start from which every
  distillation corner, reverse-KL ones included, can make progress.

Everything is seeded and single-configuration (fixed thread count, deterministic algorithms, a fixed
data order), so a rerun on the same kind of CPU reproduces the weights bit for bit (`--check`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kltd.data.addition import Example, is_correct, make_splits  # noqa: E402
from kltd.data.toy_tokenizer import build_tokenizer, save_tokenizer  # noqa: E402

ASSETS = REPO / "kltd" / "assets" / "toy"
NUM_THREADS = 1  # one thread: reproducible bit for bit, and fastest for models this small
DATA = {"seed": 0, "n_train": 20000, "n_eval": 500, "min_terms": 2, "max_terms": 5}
MAX_POSITIONS = 128
MAX_NEW_TOKENS = 64
WEIGHT_FILES = ("model.safetensors",)


@dataclass(frozen=True)
class Recipe:
    layers: int
    width: int
    intermediate: int
    heads: int
    steps: int
    batch_size: int
    lr: float
    warmup: int
    schedule: str  # "cosine" (to 10% of lr) or "constant" (after warmup)
    seed: int
    weight_decay: float = 0.0


RECIPES = {
    "teacher": Recipe(layers=3, width=128, intermediate=512, heads=4, steps=3000, batch_size=32, lr=2e-3,
                      warmup=100, schedule="cosine", seed=1),
    "student": Recipe(layers=2, width=64, intermediate=256, heads=4, steps=1400, batch_size=32, lr=1e-3,
                      warmup=20, schedule="constant", seed=2),
}


def model_config(recipe: Recipe, tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.width,
        intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )


# --- batches in the trainer's layout ------------------------------------------------------------------


def encode(tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, response ids + EOS) per example."""
    eos = tokenizer.eos_token_id
    return [
        (tokenizer.encode(e.prompt, add_special_tokens=False), tokenizer.encode(e.response, add_special_tokens=False) + [eos])
        for e in examples
    ]


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int):
    """input_ids, attention_mask, position_ids [B, P+N] and labels [B, P+N] (-100 off the response)."""
    width_p = max(len(p) for p, _ in rows)
    width_r = max(len(r) for _, r in rows)
    ids = torch.full((len(rows), width_p + width_r), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (p, r) in enumerate(rows):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p)
        ids[i, width_p : width_p + len(r)] = torch.tensor(r)
        mask[i, width_p - len(p) : width_p + len(r)] = 1
        labels[i, width_p : width_p + len(r)] = torch.tensor(r)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, labels


def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    if recipe.schedule == "constant":
        return recipe.lr
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- greedy decoding ----------------------------------------------------------------------------------


@torch.inference_mode()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Batched greedy decoding: left-padded prompts, positions from the mask, each row stops at EOS.

    No KV cache (sequences are a few dozen tokens): one full forward per new token, which keeps this
    independent of the cache API of the installed transformers version.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    finished = torch.zeros(len(rows), dtype=torch.bool)
    generated = []
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        alive = ~finished
        token = torch.where(alive, logits.argmax(-1), torch.full_like(alive, pad, dtype=torch.long))
        generated.append(token)
        finished = finished | (token == eos)
        if bool(finished.all()):
            break
        ids = torch.cat([ids, token.unsqueeze(1)], 1)
        mask = torch.cat([mask, alive.long().unsqueeze(1)], 1)
    texts = []
    for row in torch.stack(generated, 1).tolist():
        row = row[: row.index(eos)] if eos in row else row
        texts.append(tokenizer.decode(row))
    return texts


def accuracy(model, tokenizer, examples: list[Example], batch_size: int = 250) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = greedy(model, tokenizer, [e.prompt for e in chunk])
        correct += sum(is_correct(t, e) for t, e in zip(texts, chunk))
    model.train(was_training)
    return correct / len(examples)


# --- training -----------------------------------------------------------------------------------------


def train(recipe: Recipe, tokenizer, train_rows, eval_examples=None, eval_every: int = 0, log=print):
    """SFT from a seeded initialisation; returns the model. `eval_every` > 0 prints held-out accuracy on the way."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(model_config(recipe, tokenizer))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98),
                                  weight_decay=recipe.weight_decay)
    order_rng = random.Random(recipe.seed)
    order: list[int] = []
    start = time.time()
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:  # a fresh deterministic permutation per epoch
            fresh = list(range(len(train_rows)))
            order_rng.shuffle(fresh)
            order += fresh
        batch, order = order[: recipe.batch_size], order[recipe.batch_size :]
        ids, mask, positions, labels = collate([train_rows[i] for i in batch], tokenizer.pad_token_id)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, recipe)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        done = step + 1
        if done % 100 == 0 or done == recipe.steps:
            log(f"  step {done:5d}  loss {loss.item():.4f}  lr {lr_at(step, recipe):.2e}  {time.time() - start:6.1f}s")
        if eval_every and eval_examples is not None and done % eval_every == 0:
            log(f"  step {done:5d}  held-out greedy accuracy {accuracy(model, tokenizer, eval_examples):.3f}")
    model.eval()
    return model, time.time() - start


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(out_dir: Path, roles=("teacher", "student"), eval_every: int = 0, recipes=RECIPES) -> dict:
    torch.set_num_threads(NUM_THREADS)
    torch.use_deterministic_algorithms(True)
    tokenizer = build_tokenizer()
    train_split, eval_split = make_splits(**DATA)
    train_rows = encode(tokenizer, train_split)
    report = {"data": DATA, "num_threads": NUM_THREADS, "torch": torch.__version__, "models": {}}
    for role in roles:
        recipe = recipes[role]
        print(f"{role}: {recipe}", flush=True)
        model, seconds = train(recipe, tokenizer, train_rows, eval_split, eval_every,
                               log=lambda s: print(s, flush=True))
        acc = accuracy(model, tokenizer, eval_split)
        target = out_dir / role
        if target.exists():
            shutil.rmtree(target)
        model.save_pretrained(target, safe_serialization=True)
        save_tokenizer(tokenizer, target)
        params = sum(p.numel() for p in model.parameters())
        weights = {name: file_sha256(target / name) for name in WEIGHT_FILES}
        report["models"][role] = {
            "recipe": asdict(recipe),
            "parameters": params,
            "eval_greedy_accuracy": acc,
            "eval_greedy_accuracy_first_200": accuracy(model, tokenizer, eval_split[:200]),
            "train_seconds": round(seconds, 1),
            "weights_sha256": weights,
        }
        print(f"{role}: {params} parameters, held-out greedy accuracy {acc:.3f} "
              f"({len(eval_split)} prompts), trained in {seconds:.0f}s", flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary directory and compare weight sha256s with the committed ones")
    parser.add_argument("--out", type=Path, default=ASSETS, help="output directory (default: the package assets)")
    parser.add_argument("--only", choices=("teacher", "student"), help="build one model (calibration)")
    parser.add_argument("--steps", type=int, help="override the step count of --only's recipe (calibration)")
    parser.add_argument("--eval-every", type=int, default=0, help="print held-out accuracy every N steps")
    args = parser.parse_args(argv)
    roles = (args.only,) if args.only else ("teacher", "student")
    recipes = dict(RECIPES)
    if args.steps is not None:
        if not args.only:
            parser.error("--steps needs --only")
        recipes[args.only] = Recipe(**{**asdict(recipes[args.only]), "steps": args.steps})

    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            report = build(Path(tmp), roles, recipes=recipes)
            ok = True
            for role in roles:
                for name, digest in report["models"][role]["weights_sha256"].items():
                    committed = ASSETS / role / name
                    same = committed.is_file() and file_sha256(committed) == digest
                    ok &= same
                    print(f"{role}/{name}: {'OK' if same else 'MISMATCH'}")
        print("OK" if ok else "MISMATCH")
        return 0 if ok else 1

    report = build(args.out, roles, args.eval_every, recipes)
    if args.steps is None:  # a real recipe: record it (one role at a time updates only that role's entry)
        path = args.out / "calibration.json"
        if args.only and path.is_file():
            previous = json.loads(path.read_text())
            report["models"] = {**previous.get("models", {}), **report["models"]}
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
