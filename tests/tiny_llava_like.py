"""Tiny LLaVA-like VLM families of issue 18 (llava_next, llava_onevision, mistral3, internvl,
smolvlm): random-weight models built from config objects, for the shared tests (tests/conftest.py
registers them). Each builder takes the decoder's block count and returns (model in eval mode,
processor).

Every model has a one-layer vision tower over 16x16 images, a decoder of hidden size 32 and a
processor of the family's class (SmolVLM's excepted, see `_smolvlm`) with the family's image
placeholder in its chat template, built offline around conftest's word-level tokenizer (which
transformers 5 reloads as saved for these model types, Qwen2 decoders included).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# LLaVA-NeXT / OneVision anyres: a 16x16 image fits the 16x32 grid best (the first of equal
# waste), is padded to 16x32 and cut into two 16x16 tiles beside the whole image resized to 16.
PINPOINTS = [[16, 32], [32, 16]]
PIXTRAL_SPECIAL = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
INTERNVL_SPECIAL = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}


def _qwen2_text(tokenizer, layers: int, decoder: str = "qwen2"):
    """A Qwen2 decoder like conftest's qwen2 (``decoder="qwen3"``: a Qwen3 one, as InternVL3.5's):
    the first 2 blocks full attention, the rest sliding over a window shorter than the prompts
    (layer_types F F S S S S, max_window_layers 2)."""
    from transformers import Qwen2Config, Qwen3Config

    from .conftest import _text_kwargs

    config_class, extra = (Qwen3Config, {"head_dim": 8}) if decoder == "qwen3" else (Qwen2Config, {})
    return config_class(
        **_text_kwargs(tokenizer, layers),
        **extra,
        use_sliding_window=True,
        sliding_window=6,
        max_window_layers=2,
        tie_word_embeddings=False,
    )


def _vision(config_class, patch_size: int, **extra):
    """A one-layer vision tower over 16x16 images."""
    return config_class(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16, patch_size=patch_size, **extra
    )


def _llava_next(layers: int, decoder: str = "qwen2"):
    """CLIP tower (patch 8: 2x2 features per tile, CLS dropped), Qwen2 decoder as LLaVA-NeXT
    72B/110B (so the adapter's rules have per-block config to rewrite; ``decoder="llama"``: a Llama
    one, as the 7B-34B models). Image tokens: the whole image (4) + the two tiles' 2x4 grid
    unpadded to 2x2 (the image fills half the padded width) with one `image_newline` per row (2)
    -> 10."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor

    from .conftest import WORDS, _text_kwargs, build_tokenizer, pil_image_processor_class

    tokenizer = build_tokenizer(WORDS)
    image_processor = pil_image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=tokenizer.chat_template,
    )
    text = LlamaConfig(**_text_kwargs(tokenizer, layers)) if decoder == "llama" else _qwen2_text(tokenizer, layers)
    config = LlavaNextConfig(
        vision_config=_vision(CLIPVisionConfig, 8),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    return LlavaNextForConditionalGeneration(config), processor


def _mistral3(layers: int):
    """Pixtral tower (patch 4: 4x4 patches per 16x16 image), merged 2x2 by the patch merger, Mistral
    decoder with a sliding window shorter than the prompts. The processor writes the 2x2 merged
    features row by row: [IMG] [IMG] [IMG_BREAK] [IMG] [IMG] [IMG_END] -> 4 image tokens."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    from .conftest import CHAT_TEMPLATE, IMAGE, WORDS, _text_kwargs, build_tokenizer, find_processor_class, pil_image_processor_class

    tokenizer = build_tokenizer(WORDS, special_tokens=PIXTRAL_SPECIAL, chat_template=CHAT_TEMPLATE.replace(IMAGE, PIXTRAL_SPECIAL[0]))
    image_processor = pil_image_processor_class("PixtralImageProcessor")(size={"longest_edge": 16}, patch_size=4)
    # Through compressor's lookup, as the loader finds it: transformers 5.x exports PixtralProcessor as a
    # torchvision placeholder though its module runs without it (see `find_processor_class`).
    processor = find_processor_class("PixtralProcessor")(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=4, spatial_merge_size=2, chat_template=tokenizer.chat_template
    )
    # Untied head (as the released models): the conftest sharpening then leaves the embeddings alone.
    text = MistralConfig(**_text_kwargs(tokenizer, layers), head_dim=8, sliding_window=6, tie_word_embeddings=False)
    config = Mistral3Config(
        vision_config=_vision(PixtralVisionConfig, 4, head_dim=8),
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(PIXTRAL_SPECIAL[0]),
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return Mistral3ForConditionalGeneration(config), processor


def _internvl(layers: int, decoder: str = "qwen2"):
    """InternVL3 layout: InternViT tower (patch 4: 4x4 patches per 16x16 tile), pixel shuffle by
    `downsample_ratio` 0.5 -> 2x2 = 4 image tokens per tile, one tile per 16x16 image (a square
    image fits the 1x1 grid; no thumbnail then); Qwen2 decoder like qwen2's (first 2 blocks full
    attention, the rest sliding; ``decoder="qwen3"``: InternVL3.5's Qwen3). The processor writes
    <img> <IMG_CONTEXT>x4 </img>."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor, InternVLVisionConfig

    from .conftest import CHAT_TEMPLATE, IMAGE, WORDS, build_tokenizer, pil_image_processor_class, video_processor_placeholder

    template = CHAT_TEMPLATE.replace(IMAGE, INTERNVL_SPECIAL["context_image_token"])
    tokenizer = build_tokenizer(WORDS, extra_special_tokens=INTERNVL_SPECIAL, chat_template=template)
    image_processor = pil_image_processor_class("GotOcr2ImageProcessor")(
        size={"height": 16, "width": 16}, crop_to_patches=True, min_patches=1, max_patches=4
    )
    processor = InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor_placeholder(),
        image_seq_length=4,
        chat_template=template,
    )
    config = InternVLConfig(
        vision_config=_vision(InternVLVisionConfig, 4),
        text_config=_qwen2_text(tokenizer, layers, decoder),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=4,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    return InternVLForConditionalGeneration(config), processor


def _smolvlm(layers: int):
    """SmolVLM2 layout (Idefics3's, with SmolVLM's classes): SigLIP-like tower over 16x16 tiles in
    4x4 patches, pixel-shuffled by `scale_factor` 2 -> 4 tokens per tile; an image resized to 32
    is split into 2x2 tiles plus the global image -> 20 image tokens; Llama decoder under
    model.text_model.

    The processor is Idefics3's (4.57 accepts only Idefics3's image processor in it): SmolVLMProcessor
    refuses to be built without the num2words package (it spells out video frame timestamps), which
    is not installed here; for images both expand the prompt alike (<fake_token_around_image>, a
    <row_i_col_j> per tile, <global-img>) from the same image processing."""
    from transformers import Idefics3Processor, LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig

    from .conftest import IDEFICS3_SPECIAL, IMAGE, WORDS, _text_kwargs, build_tokenizer, pil_image_processor_class

    tokenizer = build_tokenizer(WORDS, special_tokens=IDEFICS3_SPECIAL)
    image_processor = pil_image_processor_class("Idefics3ImageProcessor")(
        size={"longest_edge": 32}, max_image_size={"longest_edge": 16}, do_image_splitting=True
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=4, chat_template=tokenizer.chat_template
    )
    config = SmolVLMConfig(
        vision_config=_vision(SmolVLMVisionConfig, 4),
        text_config=LlamaConfig(**_text_kwargs(tokenizer, layers)),
        scale_factor=2,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
        pad_token_id=tokenizer.pad_token_id,
    )
    return SmolVLMForConditionalGeneration(config), processor


def _llava_onevision(layers: int):
    """SigLIP tower (patch 8: 2x2 features per tile, no CLS), Qwen2 decoder like qwen2's (first 2
    blocks full attention, the rest sliding). Image tokens as LLaVA-NeXT's, the whole image's
    features first: 4 + 2x2 unpadded tile features + 2 `image_newline` rows -> 10."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, SiglipVisionConfig

    from .conftest import WORDS, build_tokenizer, pil_image_processor_class, video_processor_placeholder

    tokenizer = build_tokenizer(WORDS, special_tokens=("<video>",))
    image_processor = pil_image_processor_class("LlavaOnevisionImageProcessor")(
        size={"height": 16, "width": 16}, image_grid_pinpoints=PINPOINTS
    )
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor_placeholder(),
        num_image_tokens=4,
        vision_feature_select_strategy="full",
        chat_template=tokenizer.chat_template,
    )
    config = LlavaOnevisionConfig(
        vision_config=_vision(SiglipVisionConfig, 8),
        text_config=_qwen2_text(tokenizer, layers),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    return LlavaOnevisionForConditionalGeneration(config), processor


BUILDERS: dict[str, Callable[[int], tuple[Any, Any]]] = {
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "mistral3": _mistral3,
    "internvl": _internvl,
    "smolvlm": _smolvlm,
}
MULTIMODAL: frozenset[str] = frozenset(BUILDERS)
# Image tokens per 16x16 test image (each builder's docstring says how they add up).
IMAGE_TOKENS: dict[str, int] = {"llava_next": 10, "llava_onevision": 10, "mistral3": 4, "internvl": 4, "smolvlm": 20}
