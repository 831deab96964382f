"""The toy tokenizer: one token per character of the built-in task, in standard Hugging Face format.

Ids: <pad>=0, <eos>=1, <unk>=2, then the task's characters in the order of `kltd.data.addition.CHARACTERS`.
No BOS and no EOS are added on encode (the trainer appends EOS to responses itself), padding is on the
left, and decode joins characters without spaces, so decode(encode(s)) == s for every task string.
"""

from __future__ import annotations

from kltd.data.addition import CHARACTERS

PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
MODEL_MAX_LENGTH = 128


def vocabulary() -> dict[str, int]:
    tokens = list(SPECIAL_TOKENS) + list(CHARACTERS)
    return {token: i for i, token in enumerate(tokens)}


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over the task's characters (save it with `save_pretrained`)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab=vocabulary(), unk_token=UNK))
    # every character is its own word; WordLevel then maps it to its id
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, directory) -> None:
    """`save_pretrained`, with the generic fast-tokenizer class name so that transformers 4.x loads it too."""
    import json
    from pathlib import Path

    tokenizer.save_pretrained(directory)
    config_path = Path(directory) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
