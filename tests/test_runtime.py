"""compressor.runtime: visual-token pruning, SGL early exit and Skip-It bands at generation time,
on tiny random VLMs built from config (tests/conftest.py)."""

from __future__ import annotations

import pytest
import torch

from compressor.architectures import adapter_for_model
from compressor.calibration_report import CalibrationReport
from compressor.data import build_batch, load_samples
from compressor.errors import InputError, PlanError
from compressor.runtime import (
    Guide,
    Participation,
    RuntimeOptions,
    SubsetLayer,
    choose_band,
    estimate_flops,
    generate,
    greedy,
    plan,
    recompute,
    resolve,
)
from compressor.runtime.participation import build, image_positions
from compressor.runtime.ranking import guide_scores, self_scores

from .conftest import MULTIMODAL, build_tiny, write_data

NEW = 8
# Seeds whose tiny model answers the test prompts with several tokens and no image placeholder
# (a placeholder in the answer cannot be fed back to the cache-free reference).
SEEDS = {"llava": 0, "qwen2_vl": 1, "qwen2_5_vl": 0, "qwen3_vl": 0, "idefics3": 0, "gemma3": 0, "paligemma": 0}
MAIN = ("llava", "qwen2_vl", "qwen2_5_vl")


class Tiny:
    def __init__(self, family: str, folder, layers: int = 6, seed: int | None = None, eos: bool = False):
        self.family = family
        self.model, self.processor = build_tiny(family, layers=layers, seed=SEEDS.get(family, 0) if seed is None else seed)
        if not eos:
            # Random tiny models often say EOS within a token or two; without it every answer has
            # NEW tokens, so cached decoding is exercised at every step.
            self.model.generation_config.eos_token_id = None
        self.adapter = adapter_for_model(self.model)
        self.samples = load_samples(write_data(folder, images=family in MULTIMODAL, n=4))

    def inputs(self, index: int = 0) -> dict[str, torch.Tensor]:
        return build_batch(self.processor, [self.samples[index]], with_answer=False).inputs

    def plain(self, inputs, new: int = NEW) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=new, output_logits=True, return_dict_in_generate=True)
        return out.sequences[0, inputs["input_ids"].shape[1] :], torch.stack(out.logits)[:, 0]


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    """(family, layers=6, seed=SEEDS[family], eos=False) -> a `Tiny`, built once per module."""
    built: dict[tuple, Tiny] = {}

    def get(family: str, layers: int = 6, seed: int | None = None, eos: bool = False) -> Tiny:
        key = (family, layers, seed, eos)
        if key not in built:
            built[key] = Tiny(family, tmp_path_factory.mktemp(family), layers, seed, eos)
        return built[key]

    return get


# -- no effect: the plain model, bit for bit -------------------------------------------------------
NO_EFFECT = [RuntimeOptions(), RuntimeOptions(keep=1.0, cut=2, ranking="self"), RuntimeOptions(band=(0, -1)), RuntimeOptions(band=(0, 5))]


@pytest.mark.parametrize("family", MAIN)
@pytest.mark.parametrize("options", NO_EFFECT, ids=["default", "keep-1", "band-all-negative", "band-all"])
def test_no_effect_equals_plain_generate(vlms, family, options):
    vlm = vlms(family)
    for index in (0, 1):
        inputs = vlm.inputs(index)
        tokens, logits = vlm.plain(inputs)
        got = generate(vlm.model, vlm.processor, inputs, options, max_new_tokens=NEW)
        assert torch.equal(got.tokens, tokens) and torch.equal(got.logits, logits)
        assert not got.skipped and got.kept_per_block == (got.image_tokens,) * 6 and got.image_tokens > 0
        assert got.participation.touched == []


# -- pruned: cached decoding equals the cache-free pruned forward -----------------------------------
PRUNED = [
    RuntimeOptions(keep=0.5, cut=1, ranking="random", seed=3),
    RuntimeOptions(keep=0.5, cut=2, ranking="self"),
    RuntimeOptions(keep=0.4, depth=0.5, ranking="self", self_queries="last"),
    RuntimeOptions(band=(1, 3)),
    RuntimeOptions(band=(2, -1)),
    RuntimeOptions(keep=0.3, cut=3, band=(1, 4)),
]


def _check_against_recompute(vlm: Tiny, options: RuntimeOptions, index: int = 0) -> None:
    inputs = vlm.inputs(index)
    got = generate(vlm.model, vlm.processor, inputs, options, max_new_tokens=NEW)
    reference = recompute(vlm.model, vlm.adapter, inputs, got.participation, max_new_tokens=NEW)
    assert got.participation.touched, "the options should touch some block"
    assert len(got.tokens) >= 4, "too short an answer to exercise cached decoding"
    assert torch.equal(got.tokens, reference.tokens)
    torch.testing.assert_close(got.logits, reference.logits, rtol=1e-5, atol=1e-4)
    plain_logits = vlm.plain(inputs, new=1)[1]
    assert not torch.allclose(got.logits[0], plain_logits[0]), "pruning changed nothing: the test proves nothing"


@pytest.mark.parametrize("family", MAIN)
@pytest.mark.parametrize("options", PRUNED, ids=["random@1", "self@2", "self-last@depth", "band-1-3", "band-2-end", "band+keep"])
def test_cached_decoding_equals_cache_free_recompute(vlms, family, options):
    _check_against_recompute(vlms(family), options)


@pytest.mark.parametrize("family", ["idefics3", "qwen3_vl", "gemma3", "paligemma"])
def test_other_families_decode_consistently(vlms, family):
    """Idefics3 (Llama decoder), Qwen3-VL (DeepStack adds to image positions between blocks),
    Gemma3 (image tokens attend both ways) and PaliGemma (prefix-LM): the model's own mask, cut."""
    vlm = vlms(family)
    for options in (RuntimeOptions(keep=0.5, cut=2, ranking="self"), RuntimeOptions(band=(1, 3))):
        inputs = vlm.inputs(0)
        got = generate(vlm.model, vlm.processor, inputs, options, max_new_tokens=NEW)
        reference = recompute(vlm.model, vlm.adapter, inputs, got.participation, max_new_tokens=NEW)
        assert got.participation.touched
        assert torch.equal(got.tokens, reference.tokens)
        torch.testing.assert_close(got.logits, reference.logits, rtol=1e-5, atol=1e-4)


def test_decoding_stops_at_eos_with_and_without_cache(vlms):
    # The EOS is a token the answer says first at its third step: random weights differ between
    # transformers releases, and a tiny model's own EOS may never come within NEW tokens.
    vlm = vlms("llava")
    for index, options in ((3, RuntimeOptions()), (0, RuntimeOptions(band=(3, -1)))):
        inputs = vlm.inputs(index)
        answer = generate(vlm.model, vlm.processor, inputs, options, max_new_tokens=NEW).tokens.tolist()
        eos = next(t for i, t in enumerate(answer) if i >= 2 and t not in answer[:i])
        vlm.model.generation_config.eos_token_id = eos
        try:
            got = generate(vlm.model, vlm.processor, inputs, options, max_new_tokens=NEW)
            reference = recompute(vlm.model, vlm.adapter, inputs, got.participation, max_new_tokens=NEW)
        finally:
            vlm.model.generation_config.eos_token_id = None
        assert 1 < len(got.tokens) < NEW and int(got.tokens[-1]) == eos
        assert torch.equal(got.tokens, reference.tokens)
        torch.testing.assert_close(got.logits, reference.logits, rtol=1e-5, atol=1e-4)


def test_eager_attention_masks_are_cut_too(vlms):
    """Eager attention takes an additive float mask (SDPA a boolean one, or none)."""
    vlm = vlms("llava", seed=0)  # a model of its own: switched to eager for good
    vlm.model.set_attn_implementation("eager")
    _check_against_recompute(vlm, RuntimeOptions(keep=0.5, cut=2, ranking="self"))
    _check_against_recompute(vlm, RuntimeOptions(band=(1, 3)))


def test_ranking_pass_leaves_the_model_as_it_was(vlms):
    vlm = vlms("qwen2_vl")
    inputs = vlm.inputs(1)
    before = vlm.plain(inputs)
    generate(vlm.model, vlm.processor, inputs, RuntimeOptions(keep=0.5, cut=2, ranking="self"), max_new_tokens=NEW)
    after = vlm.plain(inputs)
    assert vlm.model.config._attn_implementation == "sdpa"
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])


# -- positions and the cache ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_kept_tokens_keep_their_original_positions(vlms, family):
    """The rotary tables (M-RoPE for Qwen2-VL) a pruned block's attention receives are the whole
    sequence's at the kept positions, not those of positions 0..n-1."""
    vlm = vlms(family)
    inputs = vlm.inputs(0)
    images = image_positions(inputs["input_ids"], vlm.adapter.image_token_id(vlm.model.config))
    resolved = resolve(RuntimeOptions(keep=0.5, cut=2, ranking="random"), vlm.model, vlm.processor, vlm.adapter, inputs)
    participation, _ = plan(vlm.model, vlm.adapter, inputs, images, resolved)
    seen: dict[int, torch.Tensor] = {}

    def note(index: int, kwargs: dict) -> None:
        seen[index] = kwargs["position_embeddings"][0]  # cos; max_new_tokens=1: the prompt's pass only

    blocks = vlm.adapter.blocks(vlm.model)
    handles = [blocks[i].self_attn.register_forward_pre_hook(lambda m, a, k, i=i: note(i, k), with_kwargs=True) for i in (0, 3)]
    try:
        greedy(vlm.model, vlm.adapter, inputs, participation, max_new_tokens=1)
    finally:
        for handle in handles:
            handle.remove()
    kept = participation.sets[3]
    assert participation.sets[0] is None and len(kept) < inputs["input_ids"].shape[1]
    full, pruned = seen[0], seen[3]
    assert pruned.shape[-2] == len(kept)
    assert torch.equal(pruned, full.index_select(-2, kept))
    assert not torch.allclose(pruned, full[..., : len(kept), :]), "renumbered positions would give the same tables"


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_cache_of_pruned_blocks_holds_text_kept_and_generated(vlms, family):
    vlm = vlms(family)
    inputs = vlm.inputs(0)
    length = inputs["input_ids"].shape[1]
    images = image_positions(inputs["input_ids"], vlm.adapter.image_token_id(vlm.model.config))
    cut = 2
    resolved = resolve(RuntimeOptions(keep=0.5, cut=cut, ranking="random"), vlm.model, vlm.processor, vlm.adapter, inputs)
    participation, kept = plan(vlm.model, vlm.adapter, inputs, images, resolved)
    decoded = greedy(vlm.model, vlm.adapter, inputs, participation, max_new_tokens=NEW)
    fed = len(decoded.tokens) - 1  # the last token is never fed back
    text = length - len(images)
    for index, layer in enumerate(decoded.cache.layers):
        if index < cut:
            assert not isinstance(layer, SubsetLayer) and layer.keys.shape[-2] == length + fed
            continue
        assert isinstance(layer, SubsetLayer)
        assert layer.keys.shape[-2] == layer.values.shape[-2] == text + kept[index] + fed
        expected = torch.cat([participation.sets[index], torch.arange(length, length + fed)])
        assert torch.equal(layer.positions, expected)
        assert layer.get_seq_length() == length + fed  # what the model counts positions from
    assert kept[cut:] == (len(images) - len(images) // 2,) * (6 - cut)


# -- rankings -----------------------------------------------------------------------------------------
def _attentions(model, inputs) -> tuple[torch.Tensor, ...]:
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True, use_cache=False).attentions
    finally:
        model.set_attn_implementation("sdpa")


def test_guide_ranking_is_deterministic_and_sums_every_layer(vlms):
    guide = vlms("llava", layers=3, seed=7)
    inputs = guide.inputs(0)
    answer = guide.plain(inputs)[0]
    images = image_positions(inputs["input_ids"], guide.adapter.image_token_id(guide.model.config))
    first = guide_scores(guide.model, guide.adapter, inputs, answer, images)
    assert torch.equal(first, guide_scores(guide.model, guide.adapter, inputs, answer, images))
    full = {"input_ids": torch.cat([inputs["input_ids"], answer[None]], 1), "pixel_values": inputs["pixel_values"]}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    readers = torch.ones(full["input_ids"].shape[1], dtype=torch.bool)
    readers[images] = False
    per_layer = [a[0].double().sum(0)[readers][:, images].sum(0) for a in _attentions(guide.model, full)]
    assert len(per_layer) == 3
    torch.testing.assert_close(first, sum(per_layer), rtol=1e-6, atol=1e-9)
    assert not torch.allclose(first, sum(per_layer[:-1]))


def test_self_ranking_is_the_attention_at_the_block_before_the_cut(vlms):
    vlm = vlms("qwen2_5_vl")
    inputs = vlm.inputs(0)
    images = image_positions(inputs["input_ids"], vlm.adapter.image_token_id(vlm.model.config))
    everything = Participation.everything(inputs["input_ids"].shape[1], 6)
    attention = _attentions(vlm.model, inputs)[2][0].double().sum(0)  # block 2, summed over heads
    text = torch.ones(attention.shape[0], dtype=torch.bool)
    text[images] = False
    got = self_scores(vlm.model, vlm.adapter, inputs, everything, 3, images, "text")
    torch.testing.assert_close(got, attention[text][:, images].sum(0), rtol=1e-6, atol=1e-9)
    got = self_scores(vlm.model, vlm.adapter, inputs, everything, 3, images, "last")
    torch.testing.assert_close(got, attention[-1, images], rtol=1e-6, atol=1e-9)


def test_random_ranking_is_seeded(vlms):
    vlm = vlms("llava")
    inputs = vlm.inputs(0)
    runs = [
        generate(vlm.model, vlm.processor, inputs, RuntimeOptions(keep=0.25, cut=1, ranking="random", seed=s), max_new_tokens=1)
        for s in (1, 1, 2)
    ]
    assert torch.equal(runs[0].participation.sets[1], runs[1].participation.sets[1])
    assert not torch.equal(runs[0].participation.sets[1], runs[2].participation.sets[1])
    assert runs[0].kept_per_block == (16, 4, 4, 4, 4, 4)


# -- SGL: guide ranking and early exit ------------------------------------------------------------------
def test_guide_ranking_prunes_by_the_guides_attention(vlms):
    vlm, small = vlms("llava"), vlms("llava", layers=3, seed=7)
    inputs = vlm.inputs(0)
    got = generate(
        vlm.model,
        vlm.processor,
        inputs,
        RuntimeOptions(keep=0.25, cut=2, ranking="guide"),
        guide=Guide(small.model, small.processor),
        max_new_tokens=NEW,
    )
    images = image_positions(inputs["input_ids"], vlm.adapter.image_token_id(vlm.model.config))
    scores = guide_scores(small.model, small.adapter, inputs, got.guide.decoded.tokens, images)
    best = images[torch.argsort(-scores, stable=True)[:4]].sort().values
    text = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    text[images] = False
    assert torch.equal(got.participation.sets[2], torch.cat([text.nonzero().squeeze(1), best]).sort().values)
    assert not got.skipped and got.guide.consistent is None
    reference = recompute(vlm.model, vlm.adapter, inputs, got.participation, max_new_tokens=NEW)
    assert torch.equal(got.tokens, reference.tokens)


def test_early_exit_fires_only_when_confident_and_consistent(vlms):
    # With EOS: answers of a few tokens, so some of them survive the guide's 5 % of image tokens.
    # The guide's seed gives both outcomes under transformers 4.57 and 5.x (whose random weights differ).
    vlm, small = vlms("llava", eos=True), vlms("llava", layers=2, seed=3, eos=True)
    guide = Guide(small.model, small.processor)
    fired = 0
    for index in range(4):
        inputs = vlm.inputs(index)
        answer, answer_logits = small.plain(inputs)
        confidence = generate(
            vlm.model, vlm.processor, inputs, RuntimeOptions(early_exit=1.0), guide=guide, max_new_tokens=NEW
        ).guide_confidence
        assert confidence == pytest.approx(torch.log_softmax(answer_logits, -1).max(-1).values.mean().exp().item())
        # Above the guide's confidence: never fires; the large model's plain answer, bit for bit.
        tokens, logits = vlm.plain(inputs)
        above = generate(
            vlm.model, vlm.processor, inputs, RuntimeOptions(early_exit=min(1.0, confidence + 1e-3)), guide=guide, max_new_tokens=NEW
        )
        assert not above.skipped and above.guide.consistent is None
        assert torch.equal(above.tokens, tokens) and torch.equal(above.logits, logits)
        # At it: fires iff the guide, given only its top 5 % image tokens from block 0 on, answers the same.
        at = generate(vlm.model, vlm.processor, inputs, RuntimeOptions(early_exit=confidence), guide=guide, max_new_tokens=NEW)
        images = image_positions(inputs["input_ids"], small.adapter.image_token_id(small.model.config))
        top = images[torch.argsort(-guide_scores(small.model, small.adapter, inputs, answer, images), stable=True)[:1]]
        pruned = greedy(small.model, small.adapter, inputs, build(inputs["input_ids"].shape[1], images, [top] * 2), max_new_tokens=NEW)
        consistent = torch.equal(pruned.tokens, answer)
        assert at.guide.consistent == consistent and at.skipped == consistent
        if consistent:
            fired += 1
            assert torch.equal(at.tokens, answer) and torch.equal(at.logits, answer_logits)
            assert at.prompt_tokens_per_block == (0,) * 6
        else:
            assert torch.equal(at.tokens, tokens) and torch.equal(at.logits, logits)
    assert 0 < fired < 4, "the samples should exercise both outcomes"


# -- Skip-It band from a calibration report -------------------------------------------------------------
def _report(image_influence, attention=None) -> CalibrationReport:
    n = len(image_influence)
    table = {"all": [0.5] * n, "text": [0.5] * n, "image": list(image_influence)}
    metrics = {"block_influence": table, "adjacent_distance": table, "tail_probability": {"0.05": table}, "angular_distance": {"1": table}}
    if attention is not None:
        metrics["visual_attention"] = {"all": list(attention)}
    return CalibrationReport(model={"num_blocks": n}, data={}, options={}, metrics=metrics, elapsed_s=0.0)


def test_band_is_the_smallest_span_of_non_redundant_blocks():
    report = _report([0.3, 0.01, 0.2, 0.01, 0.02, 0.01], attention=[0.5, 0.4, 0.3, 0.01, 0.2, 0.01])
    influence = {"metric": "block_influence", "modality": "image", "below": 0.05}
    choice = choose_band(report, [influence])
    assert choice.band == (0, 2) and choice.redundant == (False, True, False, True, True, True)
    # Both conditions must hold for a block to be redundant: blocks 1 and 4 read images (attention above 0.1).
    both = choose_band(report, [influence, {"metric": "visual_attention", "below": 0.1}])
    assert both.band == (0, 4) and both.redundant == (False, False, False, True, False, True)
    # A block without a value (no image token reached it) is not redundant.
    assert choose_band(_report([0.01, None, 0.01, 0.01]), [influence]).band == (1, 1)
    assert "block_influence[image] < 0.05" in choice.describe()


def test_band_refusals():
    with pytest.raises(InputError, match="redundant in every block"):
        choose_band(_report([0.01] * 4), [{"metric": "block_influence", "modality": "image", "below": 0.05}])
    with pytest.raises(PlanError, match="no visual_attention"):
        choose_band(_report([0.01] * 4), [{"metric": "visual_attention", "below": 0.05}])
    with pytest.raises(InputError, match="Band condition 0"):
        choose_band(_report([0.01] * 4), [{"metric": "block_influence", "below": 0.05, "above": 0.01}])
    with pytest.raises(InputError, match="No condition"):
        choose_band(_report([0.01] * 4), [])


# -- FLOPs ----------------------------------------------------------------------------------------------
def test_flops_estimate_counts_what_each_block_processed(vlms):
    vlm = vlms("llava")
    inputs = vlm.inputs(0)
    got = generate(vlm.model, vlm.processor, inputs, RuntimeOptions(keep=0.5, cut=2, ranking="random"), max_new_tokens=NEW)
    length, new = inputs["input_ids"].shape[1], len(got.tokens)
    assert got.prompt_tokens_per_block == (length,) * 2 + (length - 8,) * 4
    flops = estimate_flops(vlm.model, got.prompt_tokens_per_block, new)
    full = estimate_flops(vlm.model, (length,) * 6, new)
    params = sum(p.numel() for p in vlm.adapter.blocks(vlm.model)[3].parameters())
    p, steps = length - 8, new - 1
    assert flops[3] == 2 * params * (p + steps) + 4 * 32 * (p * (p + 1) // 2 + sum(p + j for j in range(1, steps + 1)))
    assert flops[:2] == full[:2] and all(f < g for f, g in zip(flops[2:], full[2:]))


# -- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(keep=0.0), "keep = 0.0"),
        (dict(keep=1.5), "keep = 1.5"),
        (dict(keep=0.5), "no block to prune at"),
        (dict(keep=0.5, cut=1, depth=0.5), "Both cut and depth"),
        (dict(keep=0.5, depth=1.0), "depth = 1.0"),
        (dict(ranking="best"), "not a ranking"),
        (dict(early_exit=0.0), "early_exit = 0.0"),
        (dict(band=(1,)), "two block indices"),
    ],
)
def test_bad_options_are_refused(options, match):
    with pytest.raises(InputError, match=match):
        RuntimeOptions(**options)


@pytest.mark.parametrize(
    "options, match",
    [
        (RuntimeOptions(keep=0.5, cut=6), "cut = 6 is not a block of this model, which has 6"),
        (RuntimeOptions(keep=1.0, cut=9), "cut = 9 is not a block"),
        (RuntimeOptions(keep=0.5, cut=-7), "cut = -7"),
        (RuntimeOptions(band=(3, 1)), "an empty band"),
        (RuntimeOptions(band=(0, 6)), "band = 6 is not a block"),
        (RuntimeOptions(keep=0.5, cut=0, ranking="self"), "cut is block 0"),
        (RuntimeOptions(keep=0.5, cut=5, ranking="self", band=(0, 2)), "outside the band"),
        (RuntimeOptions(keep=0.5, cut=1, ranking="guide"), "needs a guide"),
        (RuntimeOptions(early_exit=0.9), "early_exit needs a guide"),
    ],
)
def test_options_that_do_not_fit_the_model_are_refused(vlms, options, match):
    vlm = vlms("llava")
    with pytest.raises(InputError, match=match):
        generate(vlm.model, vlm.processor, vlm.inputs(0), options)


def test_wrong_guides_batches_and_models_are_refused(vlms):
    from compressor.demo.processor import build_llava_processor, build_tokenizer

    from .conftest import WORDS

    vlm = vlms("llava")
    inputs = vlm.inputs(0)
    options = RuntimeOptions(keep=0.5, cut=1, ranking="guide")
    other = vlms("qwen2_vl")
    with pytest.raises(InputError, match="guide is a qwen2_vl model and this one a llava"):
        generate(vlm.model, vlm.processor, inputs, options, guide=Guide(other.model, other.processor))
    words = build_llava_processor(build_tokenizer([*WORDS, "triangle"]), image_size=16, patch_size=4)
    with pytest.raises(InputError, match="another vocabulary"):
        generate(vlm.model, vlm.processor, inputs, options, guide=Guide(vlm.model, words))
    with pytest.raises(InputError, match="nothing uses it"):
        generate(vlm.model, vlm.processor, inputs, RuntimeOptions(keep=0.5, cut=1), guide=Guide(vlm.model, vlm.processor))
    batch = build_batch(vlm.processor, vlm.samples[:2], with_answer=False).inputs
    with pytest.raises(InputError, match="batch of 2 rows"):
        generate(vlm.model, vlm.processor, batch, RuntimeOptions())
    text = vlms("llama")
    with pytest.raises(InputError, match="llama is a text-only model"):
        generate(text.model, text.processor, text.inputs(0), RuntimeOptions(keep=0.5, cut=1))
    # ... which still generates plainly without visual options.
    assert torch.equal(generate(text.model, text.processor, text.inputs(0), max_new_tokens=4).tokens, text.plain(text.inputs(0), 4)[0])


@pytest.mark.parametrize("family, match", [("qwen3_5", "no self-attention"), ("gemma4", "per-layer inputs")])
def test_families_whose_blocks_cannot_drop_tokens_are_refused(vlms, family, match):
    vlm = vlms(family)  # (skipped by conftest where transformers lacks the family)
    with pytest.raises(InputError, match=match):
        generate(vlm.model, vlm.processor, vlm.inputs(0), RuntimeOptions(band=(1, 3)))
