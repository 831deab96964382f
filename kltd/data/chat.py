"""Prompts as the student's chat template renders them, and the token that ends a response.

With a template (and data.chat_template=auto) a prompt becomes the conversation up to the assistant's
turn, generation prompt included, so the model sees exactly what it would see in use; without one (or
with data.chat_template=none) it stays plain text. A response then ends with the token the template
closes an assistant turn with (Qwen's <|im_end|>, Llama 3's <|eot_id|>), which need not be the
tokenizer's own end-of-sequence token.
"""

from __future__ import annotations

from kltd.data.formats import DataError

SENTINEL = "kltd-response-sentinel"
PLAIN_MESSAGES = ("the student's tokenizer has no chat template; messages are joined as plain text "
                  "(data.chat_template=none to silence this)")


def _messages(prompt, system_prompt: str | None) -> list[dict]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


class PromptRenderer:
    """Renders prompts (a string, or a list of {role, content} messages) for one tokenizer."""

    def __init__(self, tokenizer, chat_template: str = "auto", system_prompt: str | None = None,
                 template_kwargs: dict | None = None):
        self.tokenizer = tokenizer
        self.template_kwargs = dict(template_kwargs or {})  # data.chat_template_kwargs, e.g. enable_thinking
        self.system_prompt = system_prompt
        self.templated = chat_template == "auto" and bool(getattr(tokenizer, "chat_template", None))
        self.wanted_template = chat_template == "auto"
        self.joined_messages = False  # a conversation was joined as plain text for want of a template

    def __call__(self, prompt) -> str:
        if self.templated:
            return self.tokenizer.apply_chat_template(_messages(prompt, self.system_prompt), tokenize=False,
                                                      add_generation_prompt=True, **self.template_kwargs)
        self.joined_messages = self.joined_messages or not isinstance(prompt, str)
        return "\n\n".join(m["content"] for m in _messages(prompt, self.system_prompt))

    def notes(self) -> list[str]:
        """What the user should know about how prompts were rendered (one line each)."""
        return [PLAIN_MESSAGES] if self.joined_messages and self.wanted_template else []

    def end_token(self) -> str | None:
        """The special token right after an assistant turn's content in the template; None without one."""
        if not self.templated:
            return None
        conversation = [{"role": "user", "content": "u"}, {"role": "assistant", "content": SENTINEL}]
        text = self.tokenizer.apply_chat_template(conversation, tokenize=False, **self.template_kwargs)
        after = text.split(SENTINEL, 1)[1] if SENTINEL in text else ""
        specials = sorted(set(self.tokenizer.all_special_tokens) | set(self.tokenizer.get_added_vocab()),
                          key=len, reverse=True)
        return next((token for token in specials if token and after.lstrip(" ").startswith(token)), None)


def use_end_token(tokenizer, renderer: PromptRenderer) -> str:
    """Make the template's end-of-turn token the run's end of response: responses are encoded with it and
    sampling stops at it. Gives a tokenizer without a pad token one. Returns the token in force."""
    give_pad_token(tokenizer)
    token = renderer.end_token()
    if token and token != tokenizer.eos_token:
        pad = tokenizer.pad_token
        tokenizer.eos_token = token
        tokenizer.pad_token = pad  # unchanged: padding never meant end of response
    give_pad_token(tokenizer)  # no end-of-sequence token of its own: pad with the template's
    if tokenizer.eos_token is None:
        raise DataError("the student's tokenizer has no end-of-sequence token (eos_token) and no chat template "
                        "that ends a turn; kltd ends every response with one: give the tokenizer an eos_token")
    return tokenizer.eos_token


def give_pad_token(tokenizer) -> None:
    """Batches are padded to a common width, and many tokenizers have no pad token (GPT-2's, Llama's): reuse
    the end-of-sequence token, as is customary. Padding never changes what is supervised, even when pad and end
    of response are one token: kltd marks prompt and response tokens by their lengths (kltd.rollout.batch:
    left_pad, pad_responses; the sampler's mask of the tokens it drew), never by comparing ids with the pad id."""
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
