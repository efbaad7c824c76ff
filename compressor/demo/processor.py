"""Offline tokenizer and LLaVA processor for small self-made models.

Nothing may be downloaded here, so the demo model and the test models bring their own
word-level tokenizer (built from a word list) and a real `LlavaProcessor` around it. The
chat template is a plain USER/ASSISTANT one, so the same code path that formats prompts for
real Hub models (``apply_chat_template``) is exercised by the demo and the tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlavaProcessor, PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, IMAGE = "<pad>", "<unk>", "<s>", "</s>", "<image>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, IMAGE)

# Words every prompt uses through the chat template, whatever the task vocabulary is.
TEMPLATE_WORDS = ("USER", "ASSISTANT", ":", "?", ".", ",")

# Content may be a plain string (text models) or a list of typed parts (processors).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER : {% else %}ASSISTANT : {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% else %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] != 'user' %}</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT :{% endif %}"
)


def build_tokenizer(
    words: Iterable[str],
    *,
    special_tokens: Sequence[str] = (),
    extra_special_tokens: Mapping[str, str] | None = None,
    tokenizer_class: type[PreTrainedTokenizerFast] = PreTrainedTokenizerFast,
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer over ``words`` (plus template words and special tokens).

    Other model families need more: ``special_tokens`` are extra unsplittable tokens (Qwen's
    ``<|image_pad|>``, Idefics3's ``<row_1_col_1>``); ``extra_special_tokens`` are named ones
    that become tokenizer attributes (Gemma3's ``image_token``, ``boi_token``, ...);
    ``tokenizer_class`` is a fast tokenizer class that a processor insists on (e.g.
    ``Qwen2TokenizerFast``), built around the same word-level model.
    """
    named = dict(extra_special_tokens or {})
    added = [t for t in (*special_tokens, *named.values()) if t not in SPECIAL_TOKENS]
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *added, *TEMPLATE_WORDS, *sorted(set(words))):
        vocab.setdefault(token, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split on whitespace and punctuation, so "red?" is two words, like the vocabulary.
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = tokenizer_class(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IMAGE, *dict.fromkeys(added)],
        extra_special_tokens=named,
        chat_template=chat_template,
        # No token_type_ids: decoder models reject them in generate().
        model_input_names=["input_ids", "attention_mask"],
    )
    # transformers 5 reads `additional_special_tokens` only when no `extra_special_tokens` are
    # given (its new name for the list), and reads a dict there as named tokens: the list above
    # is then dropped and "<image>" splits into "<unk>"s. Registering what is missing afterwards
    # works in every version (the tokens are in the vocabulary already, so no id changes).
    extras = list(dict.fromkeys([IMAGE, *added]))
    if any(token not in tokenizer.all_special_tokens for token in extras):
        tokenizer.add_special_tokens({"additional_special_tokens": extras})
    return tokenizer


def build_llava_processor(tokenizer: PreTrainedTokenizerFast, image_size: int, patch_size: int) -> LlavaProcessor:
    """A LlavaProcessor whose image size and patch size match a small CLIP vision tower."""
    # The PIL class, the one the loader reloads (in transformers 5.x `CLIPImageProcessor` is the torchvision
    # one, and without torchvision transformers swaps in the PIL one with a warning).
    from ..loading import pil_image_processor_class

    image_processor = pil_image_processor_class("CLIPImageProcessor")(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        # "default" drops the CLS feature: one image token per patch.
        vision_feature_select_strategy="default",
        chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
