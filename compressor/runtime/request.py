"""`compressor generate`: one greedy answer of a model to one prompt (and image), with the run-time
visual-token options of this package, and what it cost.

`Request` holds the command's options as the user gave them; `answer` checks every one of them
before a model loads (each refusal names the option and the fix), loads the model (and the
guide) as the other commands do, builds the prompt as `validate` asks its questions (the chat
template, `accuracy.generate_answers`), runs `generate` and returns an `Answer`: the decoded text,
what took part in each block, the guide's verdict, and a FLOPs estimate against the plain model.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..errors import InputError
from .band import BandChoice
from .generate import Generation
from .options import RuntimeOptions

# A-B, also A:B and A..B (as `validate --visual-band`); negative blocks count from the end: 2--1.
BAND_PATTERN = re.compile(r"^\s*(-?\d+)\s*(?:-|:|\.\.)\s*(-?\d+)\s*$")
BAND_FIX = "write FIRST-LAST, 0-based and inclusive, e.g. --visual-band 1-4 (negative from the end: 2--1 ends at the last block)."
_NUMBERS = ("below", "above", "epsilon")
WHERE_EXAMPLE = "metric=block_influence,modality=image,below=0.05"


@dataclass(frozen=True)
class Request:
    """The options of `compressor generate`, as given (None: not given). Messages name them by
    their flags: ``keep`` is --visual-keep, ``band`` --visual-band ("A-B"), ``band_where``
    --band-where ("key=value,..." each)."""

    model: str
    prompt: str
    image: Path | None = None
    max_new_tokens: int = 32
    keep: float | None = None
    cut: int | None = None
    depth: float | None = None
    ranking: str | None = None
    self_queries: str | None = None
    seed: int | None = None
    guide: str | None = None
    early_exit: float | None = None
    band: str | None = None
    band_from: Path | None = None
    band_where: tuple[str, ...] = ()
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    @property
    def visual(self) -> bool:
        """Whether anything acts on image tokens."""
        return (
            (self.keep is not None and self.keep < 1) or self.band is not None or self.band_from is not None or self.early_exit is not None
        )


@dataclass(frozen=True)
class Answer:
    """One generation and its cost. FLOPs are `estimate_flops`' (decoder blocks only): this model
    as it ran, the guide's generation (plus its consistency check when the early exit made one),
    and the plain model — every block taking every prompt token — for as many new tokens."""

    text: str
    generation: Generation
    options: RuntimeOptions
    band: BandChoice | None  # how --band-from chose the band (None: --visual-band or no band)
    model_flops: float
    guide_flops: float
    plain_flops: float
    model: str
    guide: str | None = None

    @property
    def flops(self) -> float:
        return self.model_flops + self.guide_flops

    def to_dict(self) -> dict[str, Any]:
        g = self.generation
        options = asdict(self.options)
        options["band"] = list(self.options.band) if self.options.band is not None else None
        exit_ = None
        if self.options.early_exit is not None:
            exit_ = {"threshold": self.options.early_exit, "fired": g.skipped, "consistent": g.guide.consistent if g.guide else None}
        band = None
        if self.options.band is not None:
            band = {"blocks": list(self.options.band), "from": "calibration" if self.band else "--visual-band"}
            if self.band is not None:
                band.update(redundant=list(self.band.redundant), criterion=self.band.criterion)
        return {
            "model": self.model,
            "guide": self.guide,
            "answer": self.text,
            "tokens": [int(t) for t in g.tokens],
            "new_tokens": len(g.tokens),
            "image_tokens": g.image_tokens,
            "kept_per_block": list(g.kept_per_block),
            "prompt_tokens_per_block": list(g.prompt_tokens_per_block),
            "options": options,
            "band": band,
            "early_exit": exit_,
            "guide_confidence": g.guide_confidence,
            "flops": {
                "model": self.model_flops,
                "guide": self.guide_flops,
                "total": self.flops,
                "plain": self.plain_flops,
                "ratio": self.flops / self.plain_flops if self.plain_flops else None,
            },
        }

    def describe(self) -> str:
        g = self.generation
        lines = [f"answer: {self.text}"]
        if g.image_tokens:
            lines.append(f"image tokens: {g.image_tokens} in the prompt; taking part per block: {_runs(g.kept_per_block)}")
        else:
            lines.append("image tokens: none in the prompt")
        if self.band is not None:
            lines.append(f"band: {self.band.describe()}")
        elif self.options.band is not None:
            lines.append(f"band: image tokens take part in blocks {self.options.band[0]}..{self.options.band[1]}")
        if g.guide is not None:
            line = f"guide: confidence {g.guide.confidence:.3f}"
            threshold = self.options.early_exit
            if threshold is None:
                line += " (ranks the image tokens)"
            elif g.skipped:
                line += f" >= {threshold:g} and consistent: early exit fired, the answer is the guide's ({self.model} did not run)"
            elif g.guide.consistent is None:
                line += f" < {threshold:g}: no early exit"
            else:
                kept = f"{self.options.consistency_keep:.0%}"
                line += f" >= {threshold:g}, but its answer changed with {kept} of the image tokens: no early exit"
            lines.append(line)
        parts = f" (this model {self.model_flops:.3g} + guide {self.guide_flops:.3g})" if self.guide is not None else ""
        ratio = f"{self.flops / self.plain_flops:.1%}" if self.plain_flops else "n/a"
        lines.append(
            f"FLOPs (decoder blocks, estimate): {self.flops:.3g}{parts} = {ratio} of the plain model's {self.plain_flops:.3g} "
            f"for {len(g.tokens)} new token(s)"
        )
        return "\n".join(lines)


def _runs(values: tuple[int, ...]) -> str:
    """Per-block counts, compact: "16 (blocks 0-1), 8 (blocks 2-5)"."""
    parts, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            blocks = f"block {start}" if i - 1 == start else f"blocks {start}-{i - 1}"
            parts.append(f"{values[start]} ({blocks})")
            start = i
    return ", ".join(parts)


def answer(request: Request) -> Answer:
    """Check ``request``, load the model (and guide), answer the prompt; see the module docstring."""
    from ..architectures import adapter_for_config
    from ..hub import resolve_model_ref
    from ..loading import load_config

    image = _check_request(request)
    source = resolve_model_ref(request.model, trust_remote_code=request.trust_remote_code)
    config = load_config(source.path, trust_remote_code=source.trust_remote_code)
    adapter = adapter_for_config(config)
    num_blocks = adapter.num_blocks(config)
    if adapter.image_token_id(config) is None and (request.visual or image is not None):
        given = [flag for flag, on in _visual_flags(request) if on] + (["--image"] if image is not None else [])
        raise InputError(
            f"'{request.model}' is a text-only {adapter.family} model, and {', '.join(given)} "
            f"{'acts' if len(given) == 1 else 'act'} on images.",
            fix="drop them (plain generation), or use a vision-language model.",
        )
    if request.visual and image is None:
        flags = [flag for flag, on in _visual_flags(request) if on]
        raise InputError(
            f"{', '.join(flags)} {'acts' if len(flags) == 1 else 'act'} on the prompt's image tokens, and no --image was given.",
            fix="add --image PATH, or drop them.",
        )
    _check_blocks_fit(request, num_blocks)
    band, choice = _band(request, num_blocks)
    _check_self_ranking(request, num_blocks, band)
    guide_source = None
    if request.guide is not None:
        guide_source = resolve_model_ref(request.guide, trust_remote_code=request.trust_remote_code)
        guide_family = adapter_for_config(load_config(guide_source.path, trust_remote_code=guide_source.trust_remote_code)).family
        if guide_family != adapter.family:
            raise InputError(
                f"--guide '{request.guide}' is a {guide_family} model and '{request.model}' a {adapter.family} model; "
                "SGL's guide reads the same inputs as the model.",
                fix=f"use a guide of the {adapter.family} family with the same tokenizer (e.g. the pruned checkpoint of MODEL).",
            )
    options = RuntimeOptions(
        keep=1.0 if request.keep is None else request.keep,
        cut=request.cut,
        depth=request.depth,
        ranking=request.ranking or "self",
        self_queries=request.self_queries or "text",
        seed=0 if request.seed is None else request.seed,
        band=band,
        early_exit=request.early_exit,
    )
    return _run(request, source, guide_source, image, options, choice)


def _run(
    request: Request, source: Any, guide_source: Any, image: Path | None, options: RuntimeOptions, choice: BandChoice | None
) -> Answer:
    import torch

    from ..data import Sample, build_batch, tokenizer_of
    from ..loading import input_device, load_model
    from .flops import estimate_flops
    from .generate import generate
    from .options import Guide, _check_guide
    from .ranking import kept_count

    loaded = load_model(source, device=request.device, dtype=request.dtype)
    guide = None
    if guide_source is not None:
        guided = load_model(guide_source, device=request.device, dtype=request.dtype)
        guide = Guide(guided.model, guided.processor)
        try:
            _check_guide(loaded.model, loaded.processor, loaded.adapter, guide)
        except InputError as error:
            raise InputError(f"--guide '{request.guide}': {error.message}", fix=error.fix) from None
    sample = Sample(prompt=request.prompt, image=image)
    # As `accuracy.generate_answers` asks validate's questions: the chat template, left padding.
    inputs = build_batch(loaded.processor, [sample], with_answer=False, padding_side="left", text_format="chat")
    inputs = inputs.to(input_device(loaded.model)).inputs
    with torch.no_grad():
        generation = generate(loaded.model, loaded.processor, inputs, options, guide=guide, max_new_tokens=request.max_new_tokens)
    text = tokenizer_of(loaded.processor).decode(generation.tokens, skip_special_tokens=True).strip()
    new = len(generation.tokens)
    length = inputs["input_ids"].shape[1]
    blocks = len(generation.prompt_tokens_per_block)
    model_flops = sum(estimate_flops(loaded.model, generation.prompt_tokens_per_block, new))
    plain_flops = sum(estimate_flops(loaded.model, [length] * blocks, new))
    guide_flops = 0.0
    if guide is not None and generation.guide is not None:
        run = generation.guide
        answer_length = len(run.decoded.tokens)
        guide_flops = sum(estimate_flops(guide.model, run.participation.prompt_tokens(), answer_length))
        if run.consistent is not None:  # the check: the guide again with its top image tokens from block 0 on
            kept = length - generation.image_tokens + kept_count(generation.image_tokens, options.consistency_keep)
            guide_flops += sum(estimate_flops(guide.model, [kept] * len(run.participation.sets), answer_length))
    return Answer(
        text=text,
        generation=generation,
        options=options,
        band=choice,
        model_flops=model_flops,
        guide_flops=guide_flops,
        plain_flops=plain_flops,
        model=source.public_name,
        guide=guide_source.public_name if guide_source is not None else None,
    )


def _visual_flags(request: Request) -> list[tuple[str, bool]]:
    return [
        ("--visual-keep", request.keep is not None and request.keep < 1),
        ("--visual-band", request.band is not None),
        ("--band-from", request.band_from is not None),
        ("--early-exit", request.early_exit is not None),
    ]


def _check_request(request: Request) -> Path | None:
    """Every check that needs no model; returns the image's resolved path."""
    if not request.prompt.strip():
        raise InputError("--prompt is empty.", fix="pass the question, e.g. --prompt 'what color is the circle?'.")
    keep, cut, depth = request.keep, request.cut, request.depth
    if keep is not None and not (isinstance(keep, (int, float)) and 0 < keep <= 1):
        raise InputError(
            f"--visual-keep {keep}: the share of image tokens kept must lie in (0, 1].",
            fix="use e.g. --visual-keep 0.5 (1 keeps every image token).",
        )
    if cut is not None and depth is not None:
        raise InputError("--visual-cut and --visual-depth both say where pruning starts.", fix="give one of them.")
    if depth is not None and not 0 <= depth < 1:
        raise InputError(f"--visual-depth {depth}: the cut as a fraction of the depth lies in [0, 1).", fix="use e.g. --visual-depth 0.25.")
    if keep is None:
        given = [
            flag
            for flag, value in (
                ("--visual-cut", cut),
                ("--visual-depth", depth),
                ("--ranking", request.ranking),
                ("--self-queries", request.self_queries),
                ("--seed", request.seed),
            )
            if value is not None
        ]
        if given:
            raise InputError(
                f"{', '.join(given)} choose how image tokens are pruned, but --visual-keep is not given: nothing is pruned.",
                fix="add --visual-keep R (e.g. 0.5), or drop them.",
            )
    if keep is not None and keep < 1 and cut is None and depth is None:
        raise InputError(
            f"--visual-keep {keep} prunes image tokens, but no block to start at was given.",
            fix="add --visual-cut K (a block) or --visual-depth F (a fraction of the depth, e.g. 0.25).",
        )
    ranking = request.ranking or "self"
    if request.self_queries is not None and ranking != "self":
        raise InputError(f"--self-queries applies to --ranking self, not {ranking}.", fix="drop --self-queries.")
    if request.seed is not None and ranking != "random":
        raise InputError(f"--seed applies to --ranking random, not {ranking}.", fix="drop --seed.")
    if request.early_exit is not None and not 0 < request.early_exit <= 1:
        raise InputError(f"--early-exit {request.early_exit}: a confidence threshold lies in (0, 1].", fix="use e.g. --early-exit 0.9.")
    _check_band_options(request)
    ranks = ranking == "guide" and keep is not None and keep < 1
    if ranking == "guide" and not ranks:
        raise InputError(
            "--ranking guide ranks the image tokens that --visual-keep R < 1 keeps, and --visual-keep prunes nothing.",
            fix="add --visual-keep R < 1 (and --visual-cut or --visual-depth), or drop --ranking guide.",
        )
    needs_guide = ranks or request.early_exit is not None
    if needs_guide and request.guide is None:
        what = "--ranking guide" if ranks else "--early-exit"
        raise InputError(
            f"{what} needs SGL's guide model, and no --guide was given.",
            fix="add --guide GUIDE_MODEL (e.g. the pruned checkpoint of MODEL).",
        )
    if request.guide is not None and not needs_guide:
        raise InputError(
            "--guide was given, but nothing uses it: the guide ranks image tokens for --ranking guide and decides --early-exit.",
            fix="add --ranking guide (with --visual-keep R < 1) or --early-exit T, or drop --guide.",
        )
    return None if request.image is None else _check_image(request.image)


def _check_band_options(request: Request) -> None:
    if request.band is not None and request.band_from is not None:
        raise InputError("--visual-band and --band-from both give the band.", fix="give one of them.")
    if request.band_where and request.band_from is None:
        raise InputError(
            "--band-where says how to read a calibration report, and no --band-from was given.", fix="add --band-from CALIBRATION.json."
        )
    if request.band_from is not None and not request.band_where:
        raise InputError(
            "--band-from needs the conditions under which image tokens are redundant in a block.",
            fix=f"add --band-where '{WHERE_EXAMPLE}' (repeatable; every condition must hold).",
        )
    if request.band is not None:
        _parse_band(request.band)
    for text in request.band_where:
        _parse_condition(text)


def _parse_band(text: str, num_blocks: int | None = None) -> tuple[int, int]:
    """--visual-band's two blocks; normalised (and checked against the depth) given ``num_blocks``.
    Without it, only a band that is reversed whatever the depth is refused."""
    match = BAND_PATTERN.match(text)
    if match is None:
        raise InputError(f"--visual-band '{text}' is not a range of blocks.", fix=BAND_FIX)
    first, last = int(match[1]), int(match[2])
    if num_blocks is not None:
        for block in (first, last):
            if not -num_blocks <= block < num_blocks:
                raise InputError(
                    f"--visual-band {text}: block {block} is beyond this model's {num_blocks} blocks "
                    f"(0..{num_blocks - 1}, or negative from the end).",
                    fix=f"write FIRST-LAST within 0..{num_blocks - 1}.",
                )
        first, last = first % num_blocks, last % num_blocks
    if (first >= 0) == (last >= 0) and first > last:
        raise InputError(f"--visual-band {text}: its first block {first} comes after its last {last} (an empty band).", fix=BAND_FIX)
    return first, last


def _parse_condition(text: str) -> Any:
    from ..recipe import Condition

    fix = (
        f"write KEY=VALUE pairs separated by commas, e.g. --band-where '{WHERE_EXAMPLE}' (keys: metric, modality, below or above, epsilon)."
    )
    fields: dict[str, Any] = {}
    for part in text.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not key or not value:
            raise InputError(f"--band-where '{text}': '{part.strip()}' is not KEY=VALUE.", fix=fix)
        if key in fields:
            raise InputError(f"--band-where '{text}' gives '{key}' twice.", fix=fix)
        if key in _NUMBERS:
            try:
                fields[key] = float(value)
            except ValueError:
                raise InputError(f"--band-where '{text}': {key}={value} is not a number.", fix=fix) from None
        else:
            fields[key] = value
    try:
        return Condition.model_validate(fields)
    except ValidationError as error:
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "") + e["msg"].removeprefix("Value error, ") for e in error.errors()
        )
        raise InputError(f"--band-where '{text}': {problems}.", fix=fix) from None


def _check_blocks_fit(request: Request, num_blocks: int) -> None:
    last = num_blocks - 1
    if request.cut is not None and not -num_blocks <= request.cut <= last:
        raise InputError(
            f"--visual-cut {request.cut} is not a block of '{request.model}', which has {num_blocks} "
            f"(0..{last}, or negative from the end).",
            fix=f"use a block in 0..{last}, or --visual-depth F.",
        )
    if request.band is not None:
        _parse_band(request.band, num_blocks)


def _check_self_ranking(request: Request, num_blocks: int, band: tuple[int, int] | None) -> None:
    """FastV reads the attention image tokens receive in the block before the cut: there must be
    one, and image tokens must take part in it."""
    if request.keep is None or request.keep == 1 or (request.ranking or "self") != "self":
        return
    cut = request.cut % num_blocks if request.cut is not None else math.floor((request.depth or 0) * num_blocks)
    where = f"--visual-cut {request.cut}" if request.cut is not None else f"--visual-depth {request.depth}"
    if cut == 0:
        raise InputError(
            f"--ranking self reads the attention in the block before the cut, and the cut ({where}) is block 0.",
            fix="cut at block 1 or later, or use --ranking random (or guide, with --guide).",
        )
    if band is not None and not band[0] <= cut - 1 <= band[1]:
        raise InputError(
            f"--ranking self reads the attention image tokens receive in block {cut - 1}, before the cut ({where}), "
            f"outside the band {band[0]}-{band[1]} where they take part.",
            fix=(f"cut in blocks {band[0] + 1}..{min(band[1] + 1, num_blocks - 1)}, or " if band[0] + 1 < num_blocks else "")
            + "use --ranking random (or guide, with --guide).",
        )


def _band(request: Request, num_blocks: int) -> tuple[tuple[int, int] | None, BandChoice | None]:
    if request.band is not None:
        return _parse_band(request.band, num_blocks), None
    if request.band_from is None:
        return None, None
    from ..calibration_report import CalibrationReport
    from .band import choose_band

    report = CalibrationReport.load(request.band_from)
    if report.num_blocks != num_blocks:
        raise InputError(
            f"--band-from '{request.band_from}' measured {report.num_blocks} blocks, and '{request.model}' has {num_blocks}.",
            fix="pass the calibration report of this model (`compressor calibrate MODEL ...`).",
        )
    choice = choose_band(report, [_parse_condition(text) for text in request.band_where])
    return choice.band, choice


def _check_image(path: Path) -> Path:
    """The resolved path of a readable, intact image (its header and structure; decoded later)."""
    from ..data import MAX_IMAGE_PIXELS
    from ..data import _check_image as check

    try:
        return check(str(path), Path.cwd(), allow_outside=True)
    except ValueError as problem:  # data's _ImageProblem included; its fixes speak of data-file lines
        raise InputError(
            f"--image: {problem}.",
            fix=f"pass a readable image file (PNG, JPEG, ...) of at most {MAX_IMAGE_PIXELS // 1_000_000} megapixels.",
        ) from None
