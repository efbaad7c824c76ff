"""Run-time visual-token reduction for a loaded VLM: greedy generation in which image tokens take
part in fewer decoder blocks, without changing the checkpoint.

- visual-token pruning (FastV; SGL): from a cut block on, only the best-ranked share of image
  tokens takes part, ranked by a guide model, the model's own attention, or at random;
- SGL early exit: the guide's answer is returned, the large model skipped, when the guide is
  confident and consistent;
- Skip-It band: image tokens take part only in a band of blocks, chosen from a calibration report.

All three are one mechanism (`participation`): per block, the prompt positions that take part,
kept at their original positions, with a KV cache that holds only them. Modules: `options`
(what to do, and every check), `participation` (the hooks and the cache), `decode` (greedy with
and without cache), `ranking`, `generate` (the entry point), `band`, `flops`; `request` is
`compressor generate` (one answer from a model folder, every option checked by its flag); `compat`
holds where transformers 4.57 and 5.x differ.
"""

from .band import BandChoice, choose_band
from .decode import Decoded, greedy, recompute
from .flops import estimate_flops
from .generate import Generation, GuideRun, generate, plan
from .options import Guide, RuntimeOptions, resolve
from .participation import Participation, SubsetLayer, subset_cache, taking_part
from .request import Answer, Request, answer

__all__ = [
    "Answer",
    "BandChoice",
    "Decoded",
    "Generation",
    "Guide",
    "GuideRun",
    "Participation",
    "Request",
    "RuntimeOptions",
    "SubsetLayer",
    "answer",
    "choose_band",
    "estimate_flops",
    "generate",
    "greedy",
    "plan",
    "recompute",
    "resolve",
    "subset_cache",
    "taking_part",
]
