"""A tiny byte-level BPE tokenizer trained in-repo, with Qwen's special tokens and a ChatML template.

The embedded defaults and the tests need a tokenizer without any download. We train a byte-level
BPE (the same family as Qwen's) on text shipped with the package: the skill guides, the demo corpus
and the system prompt. The special tokens come first (ids 0..14), so a tiny model's config must
take its vision token ids from :func:`special_token_ids` rather than Qwen's 151xxx ids.

The chat template is our own Qwen-style ChatML; it renders exactly what
``genevolve_jax.processing.chat.render_messages`` renders (string content or lists of
text/image/video parts).
"""
from __future__ import annotations

import functools
import glob
import os
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

# Control tokens: never produced by decoding with skip_special_tokens.
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
# Protocol tags: single tokens like in Qwen's vocabulary, but kept in decoded text (the parser reads them).
TAG_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
              "<answer>", "</answer>")
SPECIAL_TOKENS = CONTROL_TOKENS + TAG_TOKENS

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('message role must be system, user or assistant') }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' or 'image' in part -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

DEFAULT_VOCAB_SIZE = 2048


def _package_texts() -> list[str]:
    """The in-repo text the default tokenizer is trained on."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "agent", "skills", "*.md")))
    paths += sorted(glob.glob(os.path.join(root, "data", "demo_corpus", "*.jsonl")))
    texts = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    from genevolve_jax.agent.system_prompt import build_system_prompt  # local: agent imports us lazily
    texts += [build_system_prompt(), build_system_prompt(style="compact")]
    return texts


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it with the special tokens and chat template."""
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(f"vocab_size must be >= {len(SPECIAL_TOKENS) + 256} (specials + bytes), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer=trainer)
    # Mark the tags as non-special added tokens so decode keeps them and they never split.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(CONTROL_TOKENS[1:]), clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded-defaults tokenizer (trained once per process, deterministically, in ~0.1 s)."""
    return train_tokenizer(_package_texts(), DEFAULT_VOCAB_SIZE)


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of every special token, e.g. for a tiny Qwen3VLConfig's image/vision token ids."""
    out = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no id for special token {token!r}")
        out[token] = int(token_id)
    return out
