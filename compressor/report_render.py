"""Rendering a validation report dict as `report.md` (for a PR comment) and `report.html`.

Owns presentation only: the report dict (format ``compressor.validation/1``) is made
elsewhere. Both files come from one list of sections (headings, paragraphs, tables), so they
always say the same thing; the HTML adds plots (per-block redundancy from the calibration
metrics with the removed blocks marked, accuracy before/after, latency before/after) as
embedded base64 PNGs, so the file is self-contained. Whatever is null or absent is skipped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- the document model ---------------------------------------------------------------------


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    align: str = ""  # one of "l"/"r" per column; default: first left, others right


@dataclass
class Section:
    title: str
    level: int = 2
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[str, Table]] = field(default_factory=list)  # (caption, table)
    plots: list[str] = field(default_factory=list)  # names in render_plots()
    notes: list[str] = field(default_factory=list)  # small print after the tables
    folded: bool = False  # long reference tables: collapsed in a PR comment (<details>)


# -- number formatting ----------------------------------------------------------------------
DASH = "—"


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def _pct(value: float | None, digits: int = 1) -> str:
    return DASH if value is None else f"{100 * value:.{digits}f} %"


def _points(delta: float | None) -> str:
    return DASH if delta is None else f"{100 * delta:+.1f} pts"


def _rel(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return DASH
    return f"{100 * (after - before) / abs(before):+.1f} %"


def _seconds(value: float | None) -> str:
    if value is None:
        return DASH
    if value >= 1:
        return f"{value:.3g} s"
    if value >= 1e-3:
        return f"{value * 1e3:.3g} ms"
    return f"{value * 1e6:.3g} µs"


def _bytes(value: int | None) -> str:
    if value is None:
        return DASH
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value} B"


def _times(value: float | None) -> str:
    return DASH if value is None else f"{value:.2f}×"


def _params(value: int | None) -> str:
    if value is None:
        return DASH
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return str(value)


def _get(mapping: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(mapping, dict):
            return None
        mapping = mapping.get(key)
    return mapping


# -- sections -------------------------------------------------------------------------------
WEAK = "weak evidence"


def _verdict(report: dict[str, Any]) -> Section | None:
    verdict = report.get("verdict")
    if not verdict:
        return None
    status = verdict.get("status") or ("PASS" if verdict.get("passed") else "FAIL")
    word = {"PASS": "✅ PASS", "FAIL": "❌ FAIL"}.get(status, "⚠️ NO GATES: nothing was checked")
    if verdict.get("weak_evidence"):
        word += f" (⚠️ {WEAK})"
    section = Section(f"Verdict: {word}", paragraphs=[f"**{verdict.get('summary') or word}**"])
    rows = []
    for gate in verdict.get("gates") or []:
        rows.append(
            [
                f"`{gate.get('name')}`",
                _num(gate.get("threshold")),
                _num(gate.get("value")),
                _margin(gate),
                "✅ pass" if gate.get("passed") else "❌ fail",
                str(gate.get("detail") or "") + (f" ⚠️ {WEAK}" if gate.get("weak_evidence") else ""),
            ]
        )
    if rows:
        section.tables.append(("", Table(["gate", "threshold", "value", "margin", "result", "detail"], rows, "lrrrll")))
        section.notes.append("margin: distance from the threshold; + is headroom, - is by how much the gate was missed.")
    if verdict.get("weak_evidence"):
        section.notes.append(f"{WEAK}: too few samples or scored positions behind the figure to trust it (see Evidence under Accuracy).")
    return section


def _margin(gate: dict[str, Any]) -> str:
    threshold, value = gate.get("threshold"), gate.get("value")
    if not isinstance(threshold, int | float) or not isinstance(value, int | float):
        return DASH
    distance = abs(threshold - value)
    return f"{'+' if gate.get('passed') else '-'}{_num(float(distance), 3)}"


def _models(report: dict[str, Any]) -> Section | None:
    models = report.get("models")
    if not models:
        return None
    base, pruned = models.get("base") or {}, models.get("pruned") or {}
    removed = pruned.get("removed")
    rows = [
        ["model", f"`{base.get('ref', DASH)}`", f"`{pruned.get('ref', DASH)}`", ""],
        ["blocks", _num(base.get("num_blocks")), _num(pruned.get("num_blocks")), _rel(base.get("num_blocks"), pruned.get("num_blocks"))],
        ["parameters", _params(base.get("params")), _params(pruned.get("params")), _rel(base.get("params"), pruned.get("params"))],
    ]
    section = Section("Models", tables=[("", Table(["", "base", "pruned", "change"], rows, "lllr"))])
    if removed is not None:
        section.paragraphs.append(f"Removed blocks (original 0-based numbering): **{', '.join(map(str, removed)) or 'none'}**.")
    return section


def _lower_is_better(name: str, task: dict[str, Any]) -> bool:
    if "lower_is_better" in task:
        return bool(task["lower_is_better"])
    return "perplexity" in name or "perplexity" in str(task.get("metric", "")) or "loss" in str(task.get("metric", ""))


def _accuracy(report: dict[str, Any]) -> Section | None:
    accuracy = report.get("accuracy")
    if not accuracy:
        return None
    section = Section("Accuracy", plots=["accuracy"])
    rows, skipped = [], []
    for name, task in (accuracy.get("tasks") or {}).items():
        if not task:
            skipped.append(name)
            continue
        lower = _lower_is_better(name, task)
        metric = task.get("metric") or ("perplexity" if lower else "accuracy")
        suffixes = [""] + [k.removeprefix("base_") for k in task if k.startswith("base_") and f"pruned_{k[5:]}" in task]
        for suffix in suffixes:
            key = f"_{suffix}" if suffix else ""
            before, after = task.get(f"base{key}"), task.get(f"pruned{key}")
            label = f"{metric} ({suffix})" if suffix else metric
            if lower:
                cells = [_num(before), _num(after), _rel(before, after)]
                label += " ↓"
            else:
                delta = after - before if before is not None and after is not None else None
                cells = [_pct(before), _pct(after), _points(delta)]
            rows.append([name, _num(task.get("n")), label, *cells])
    if rows:
        section.tables.append(("", Table(["task", "n", "metric", "base", "pruned", "change"], rows, "lrlrrr")))
        section.notes.append("↓: lower is better (change is relative); accuracies change in percentage points.")
    if skipped:
        section.notes.append(f"Not run: {', '.join(skipped)}.")
    fidelity = accuracy.get("fidelity")
    if fidelity:
        labels = {
            "n_samples": "samples",
            "n_positions": "positions compared",
            "answer_positions": "… answer tokens",
            "prompt_positions": "… tokens of prompt-only samples",
            "kl_mean": "mean KL(base ‖ pruned)",
            "top1_agreement": "top-1 agreement",
        }
        fid_rows = []
        for key, value in fidelity.items():
            shown = _pct(value) if key.endswith("agreement") and isinstance(value, float) else _num(value)
            fid_rows.append([labels.get(key, key), shown])
        section.tables.append(
            ("Fidelity of the pruned model's next-token distribution to the base model's", Table(["", "value"], fid_rows, "lr"))
        )
    evidence = report.get("evidence") or {}
    if evidence:
        rows = [
            [
                name,
                _num(figure.get("samples")),
                _num(figure.get("positions")),
                f"⚠️ {WEAK}: {figure.get('why')}" if figure.get("weak") else "ok",
            ]
            for name, figure in evidence.items()
        ]
        section.tables.append(
            ("Evidence: what each figure rests on", Table(["figure", "samples", "scored positions", "strength"], rows, "lrrl"))
        )
        section.notes.append(
            "Perplexity is measured on the raw text of prompt-only samples (no chat template); fidelity at every scored position: "
            "each answer token, every token of a prompt-only sample."
        )
    return section if section.tables or section.notes else None


def _runtime(report: dict[str, Any]) -> Section | None:
    """The run-time visual-token modes (`validate_runtime`): present only when they were asked for."""
    runtime = report.get("runtime")
    if not runtime:
        return None
    section = Section("Run-time modes")
    section.paragraphs.append(f"Options: `{runtime.get('flags')}` (from {runtime.get('origin')}).")
    choice = runtime.get("band_choice")
    if choice:
        band = choice.get("band") or [None, None]
        redundant = [str(i) for i, r in enumerate(choice.get("redundant") or []) if r]
        section.paragraphs.append(
            f"Band chosen from the calibration report: image tokens take part in blocks **{band[0]}..{band[1]}**; "
            f"redundant by {choice.get('criterion')}: {', '.join(redundant) or 'none'}."
        )
    rows, skipped = [], []
    for name, figures in (runtime.get("models") or {}).items():
        if not figures.get("measured"):
            skipped.append(f"{name}: {figures.get('why')}")
            continue
        options = figures.get("options") or {}
        blocks = [f"cut {options['cut']}" if options.get("cut") is not None else None]
        blocks.append(f"band {options['band'][0]}..{options['band'][1]}" if options.get("band") else None)
        kept, images = figures.get("kept_per_block"), figures.get("image_tokens")
        rows.append(
            [
                name,
                ", ".join(b for b in blocks if b) or DASH,
                _num(figures.get("n")),
                _pct(figures.get("plain_accuracy")),
                _pct(figures.get("accuracy")),
                _points(_difference(figures.get("plain_accuracy"), figures.get("accuracy"))),
                _pct(figures.get("same_answer"), 0),
                _pct(figures.get("early_exit_rate"), 0),
                f"{_num(kept, 3)} / {_num(images, 3)}" if kept is not None else DASH,
                _pct(figures.get("flops_ratio")),
                _pct(figures.get("flops_ratio_vs_base")),
                figures.get("guide") or DASH,
            ]
        )
    if rows:
        headers = [
            "model",
            "blocks",
            "n",
            "plain",
            "with mode",
            "change",
            "same answer",
            "early exit",
            "image tokens kept / block",
            "FLOPs vs plain",
            "FLOPs vs base plain",
            "guide",
        ]
        section.tables.append(("Exact match on the answered samples, one prompt at a time, greedy", Table(headers, rows, "llrrrrrrrrrl")))
    if skipped:
        section.notes.append("Not measured: " + "; ".join(skipped) + ".")
    section.notes.append(
        "blocks: the cut and band in that model's own numbering (the options give the original's). image tokens kept / block: "
        "mean over blocks and over the samples the model answered itself, of the image tokens in the prompt. FLOPs: estimate "
        "over the decoder blocks (2·params·tokens + attention), each generation at its own length; the mode's cost includes the "
        "guide's generation and SGL's consistency check, not the ranking read-outs or the vision tower."
    )
    return section


def _difference(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _workload(entry: dict[str, Any], key: str) -> str:
    if "batch_size" not in entry:
        return key
    kind = "samples" + (" with images" if entry.get("has_images") else "") if entry.get("inputs") == "samples" else "text"
    return f"{kind}, {entry.get('prompt_length')} tok × {entry.get('batch_size')}"


def _latency(report: dict[str, Any]) -> Section | None:
    latency = report.get("latency")
    if not latency:
        return None
    base, pruned, comparison = latency.get("base") or {}, latency.get("pruned") or {}, latency.get("comparison") or {}
    section = Section("Latency", plots=["latency"])
    env = pruned.get("environment") or base.get("environment") or {}
    if env:
        where = env.get("gpu") or f"{env.get('device', '?')} ({env.get('cpu_threads', '?')} threads)"
        protocol = pruned.get("protocol") or base.get("protocol") or {}
        section.paragraphs.append(
            f"Measured on **{where}**, {env.get('dtype', '?')}, timer: {env.get('timer', '?')}; "
            f"{protocol.get('warmup', '?')} warm-up runs, median and p90 of {protocol.get('repeats', '?')} repeats."
        )
    prefill_rows = []
    for key, b in (base.get("prefill") or {}).items():
        p = (pruned.get("prefill") or {}).get(key) or {}
        c = (comparison.get("prefill") or {}).get(key) or {}
        prefill_rows.append(
            [
                _workload(b, key),
                f"{_seconds(b.get('median_s'))} ({_seconds(b.get('p90_s'))})",
                f"{_seconds(p.get('median_s'))} ({_seconds(p.get('p90_s'))})" if p else DASH,
                _times(c.get("speedup")),
                _times(c.get("ideal_speedup")),
                _pct(c.get("achieved_over_ideal"), 0),
            ]
        )
    if prefill_rows:
        headers = ["prefill workload", "base median (p90)", "pruned median (p90)", "speedup", "ideal (Amdahl)", "achieved / ideal"]
        section.tables.append(("Prefill (time to process the prompt)", Table(headers, prefill_rows)))
    decode_rows = []
    for key, b in (base.get("decode") or {}).items():
        p = (pruned.get("decode") or {}).get(key) or {}
        c = (comparison.get("decode") or {}).get(key) or {}
        decode_rows.append(
            [
                f"{_workload(b, key)}, {b.get('new_tokens')} new",
                _num(b.get("tokens_per_s"), 4),
                _num(p.get("tokens_per_s"), 4) if p else DASH,
                _times(c.get("speedup")),
                _times(c.get("ideal_speedup")),
                _pct(c.get("achieved_over_ideal"), 0),
                f"{_seconds(_get(b, 'time_to_first_token', 'median_s'))} → {_seconds(_get(p, 'time_to_first_token', 'median_s'))}",
            ]
        )
    if decode_rows:
        headers = ["decode workload", "base tok/s", "pruned tok/s", "speedup", "ideal (Amdahl)", "achieved / ideal", "first token"]
        section.tables.append(("Greedy decoding (throughput after the first token)", Table(headers, decode_rows)))
    memory_rows, methods = [], set()
    for phase in ("prefill", "decode"):
        for key, b in (base.get(phase) or {}).items():
            p = (pruned.get(phase) or {}).get(key) or {}
            bm, pm = b.get("peak_memory") or {}, p.get("peak_memory") or {}
            if not bm:
                continue
            methods.add(bm.get("method", "?"))
            memory_rows.append(
                [
                    f"{phase}: {_workload(b, key)}",
                    _bytes(bm.get("peak_bytes")),
                    _bytes(pm.get("peak_bytes")),
                    _rel(bm.get("peak_bytes"), pm.get("peak_bytes")),
                ]
            )
    if memory_rows:
        section.tables.append(("Peak memory", Table(["workload", "base", "pruned", "change"], memory_rows)))
        section.notes.append(f"memory: {'; '.join(sorted(methods))}.")
    if prefill_rows or decode_rows:
        section.notes.append(
            "ideal (Amdahl): 1 / (1 − the base model's time share of the removed blocks), shares measured with hooks on "
            "every block; everything else (embeddings, vision tower, head, sampling) costs what it did."
        )
    onnx = pruned.get("onnx")
    if onnx:
        section.tables.extend(_onnx_tables(onnx, base.get("onnx"), comparison.get("onnx") or {}))
    elif "onnx" in pruned:
        section.notes.append("ONNX Runtime: no ONNX export next to the pruned checkpoint.")
    return section


def _onnx_tables(onnx: dict[str, Any], base_onnx: dict[str, Any] | None, compared: dict[str, Any]) -> list[tuple[str, Table]]:
    if "error" in onnx:
        return [("ONNX Runtime", Table(["graph", "error"], [[f"`{onnx.get('path')}`", onnx["error"]]], "ll"))]
    rows = []
    for key, p in (onnx.get("prefill") or {}).items():
        b = (base_onnx or {}).get("prefill", {}).get(key) if base_onnx and "error" not in base_onnx else None
        c = (compared.get("prefill") or {}).get(key) or {}
        rows.append(
            [
                _workload(p, key),
                f"{_seconds(b.get('median_s'))}" if b else DASH,
                f"{_seconds(p.get('median_s'))} ({_seconds(p.get('p90_s'))})",
                _times(c.get("speedup")),
                _times(c.get("onnx_over_torch")),
            ]
        )
    caption = f"ONNX Runtime prefill ({onnx.get('provider')}, onnxruntime {onnx.get('onnxruntime', '?')})"
    headers = ["workload", "base median", "pruned median (p90)", "speedup", "vs PyTorch (pruned)"]
    return [(caption, Table(headers, rows))] if rows else []


_CAL_SERIES = (  # (label, metric, modality, span)
    ("block influence (all)", "block_influence", "all", None),
    ("block influence (text)", "block_influence", "text", None),
    ("block influence (image)", "block_influence", "image", None),
    ("adjacent-token distance (all)", "adjacent_distance", "all", None),
    ("adjacent-token distance (image)", "adjacent_distance", "image", None),
    ("angular distance n=1 (all)", "angular_distance", "all", "1"),
)


def _calibration_series(calibration: dict[str, Any] | None) -> list[tuple[str, list[float | None]]]:
    """(label, one value per block) for every calibration metric present with some value."""
    metrics = (calibration or {}).get("metrics") or {}
    found = []
    for label, metric, modality, span in _CAL_SERIES:
        table = metrics.get(metric) or {}
        if span is not None:
            table = table.get(span) or {}
        values = table.get(modality)
        if values and any(v is not None for v in values):
            found.append((label, list(values)))
    return found


def _redundancy(report: dict[str, Any]) -> Section | None:
    removed = _get(report, "models", "pruned", "removed")
    series = _calibration_series(report.get("calibration"))
    if not series:
        return None
    section = Section("Per-block redundancy (calibration)", plots=["redundancy"], folded=True)
    labels = [label for label, _ in series]
    rows = []
    count = max(len(values) for _, values in series)
    gone = set(removed or [])
    for index in range(count):
        cells = [_num(values[index], 3) if index < len(values) else DASH for _, values in series]
        rows.append([f"**{index}** (removed)" if index in gone else str(index), *cells])
    section.tables.append(("", Table(["block", *labels], rows)))
    section.notes.append(
        "block influence: mean 1 − cos(h_in, h_out) per token; adjacent-token distance: mean 1 − cos between neighbouring "
        "tokens' outputs (how collapsed the representation is); angular distance n=1: arccos(cos(h_in, h_out)) / π."
    )
    return section


def _environment(report: dict[str, Any]) -> Section | None:
    env = report.get("environment")
    if not env:
        return None
    rows = [[key, _num(value)] for key, value in env.items()]
    return Section("Environment", tables=[("", Table(["", "value"], rows, "ll"))], folded=True)


def sections(report: dict[str, Any]) -> list[Section]:
    """The report's content, in reading order: verdict first, environment last."""
    title = Section(f"Validation report: `{_get(report, 'models', 'pruned', 'ref') or 'pruned model'}`", level=1)
    builders = (_verdict, _models, _accuracy, _runtime, _latency, _redundancy, _environment)
    return [title, *(s for s in (build(report) for build in builders) if s is not None)]


# -- markdown -------------------------------------------------------------------------------
def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(table: Table) -> list[str]:
    align = table.align or "l" + "r" * (len(table.headers) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = ["| " + " | ".join(map(_md_cell, table.headers)) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return lines


def _md_section(section: Section, level: int | None = None) -> list[str]:
    lines = ["#" * (level or section.level) + " " + section.title, ""]
    if section.folded:
        lines += ["<details><summary>show table</summary>", ""]  # blank line: GitHub renders markdown inside
    for paragraph in section.paragraphs:
        lines += [paragraph, ""]
    for caption, table in section.tables:
        if caption:
            lines += [f"*{caption}*", ""]
        lines += [*_md_table(table), ""]
    for note in section.notes:
        lines += [f"<sub>{note}</sub>", ""]
    if section.folded:
        lines += ["</details>", ""]
    return lines


def markdown(report: dict[str, Any]) -> str:
    lines = [line for section in sections(report) for line in _md_section(section)]
    lines.append("<sub>Plots: see report.html.</sub>")
    return "\n".join(lines) + "\n"


def markdown_excerpt(report: dict[str, Any], *, level: int = 3) -> str:
    """The verdict, accuracy and latency sections only, at heading ``level`` (for a model card)."""
    parts = (build(report) for build in (_verdict, _accuracy, _latency))
    return "\n".join(line for section in parts if section is not None for line in _md_section(section, level))


def write_markdown(report: dict[str, Any], path: Path | str) -> Path:
    path = Path(path)
    path.write_text(markdown(report), encoding="utf-8")
    return path


# -- html -----------------------------------------------------------------------------------
_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, Segoe UI, Helvetica, Arial, sans-serif; color: #1f2328; }
body { max-width: 1100px; margin: 2em auto; padding: 0 1em; }
table { border-collapse: collapse; margin: .4em 0 1.2em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; }
th { background: #f6f8fa; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
caption { text-align: left; font-style: italic; padding: 4px 0; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; }
small { color: #59636e; display: block; margin-bottom: .4em; }
img { max-width: 100%; }
"""


def _inline(text: str) -> str:
    """Escape, then the two markdown marks the sections use: **bold** and `code`."""
    out, bold, code = [], False, False
    for part in _split_marks(text):
        if part == "**" and not code:
            out.append("</strong>" if bold else "<strong>")
            bold = not bold
        elif part == "`":
            out.append("</code>" if code else "<code>")
            code = not code
        else:
            out.append(html.escape(part))
    return "".join(out)


def _split_marks(text: str) -> list[str]:
    parts, buffer, i = [], "", 0
    while i < len(text):
        mark = "**" if text.startswith("**", i) else "`" if text[i] == "`" else None
        if mark:
            parts += [buffer, mark]
            buffer, i = "", i + len(mark)
        else:
            buffer += text[i]
            i += 1
    return [*parts, buffer]


def html_document(report: dict[str, Any], plots: dict[str, bytes] | None = None) -> str:
    plots = render_plots(report) if plots is None else plots
    body = []
    title = "Validation report"
    for section in sections(report):
        if section.level == 1:
            title = section.title.replace("`", "")
        body.append(f"<h{section.level}>{_inline(section.title)}</h{section.level}>")
        body += [f"<p>{_inline(p)}</p>" for p in section.paragraphs]
        for name in section.plots:
            if name in plots:
                data = base64.b64encode(plots[name]).decode("ascii")
                body.append(f'<p><img alt="{name} plot" src="data:image/png;base64,{data}"></p>')
        if section.folded:
            body.append("<details><summary>show table</summary>")
        for caption, table in section.tables:
            align = table.align or "l" + "r" * (len(table.headers) - 1)
            rows = ["<tr>" + "".join(f'<th class="{a}">{_inline(h)}</th>' for h, a in zip(table.headers, align)) + "</tr>"]
            rows += ["<tr>" + "".join(f'<td class="{a}">{_inline(c)}</td>' for c, a in zip(row, align)) + "</tr>" for row in table.rows]
            cap = f"<caption>{_inline(caption)}</caption>" if caption else ""
            body.append(f"<table>{cap}{''.join(rows)}</table>")
        body += [f"<small>{_inline(n)}</small>" for n in section.notes]
        if section.folded:
            body.append("</details>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def write_html(report: dict[str, Any], path: Path | str) -> Path:
    path = Path(path)
    path.write_text(html_document(report), encoding="utf-8")
    return path


# -- plots ----------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: CI machines and servers have no display
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    _pyplot().close(figure)
    return buffer.getvalue()


def _redundancy_plot(report: dict[str, Any]) -> bytes | None:
    series = _calibration_series(report.get("calibration"))
    if not series:
        return None
    plt = _pyplot()
    removed = _get(report, "models", "pruned", "removed") or []
    change = [(label, values) for label, values in series if not label.startswith("adjacent")]
    collapse = [(label, values) for label, values in series if label.startswith("adjacent")]
    panels = [(change, "how much each block changes its input")] + (
        [(collapse, "how collapsed each block's output is")] if collapse else []
    )
    figure, axes = plt.subplots(len(panels), 1, figsize=(9, 3.2 * len(panels)), sharex=True, squeeze=False)
    for axis, (lines, title) in zip(axes[:, 0], panels):
        for label, values in lines:
            axis.plot(range(len(values)), [math.nan if v is None else v for v in values], marker="o", ms=3, label=label)
        for index in removed:
            axis.axvspan(index - 0.4, index + 0.4, color="tab:red", alpha=0.15, lw=0)
        axis.set_title(title, fontsize=10)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="best")
    count = max(len(values) for _, values in series)
    axes[-1, 0].set_xlabel("block (shaded: removed)")
    axes[-1, 0].set_xticks(range(count))
    return _png(figure)


def _accuracy_plot(report: dict[str, Any]) -> bytes | None:
    tasks = _get(report, "accuracy", "tasks") or {}
    scored = [(n, t) for n, t in tasks.items() if t and not _lower_is_better(n, t) and t.get("base") is not None]
    lower = [(n, t) for n, t in tasks.items() if t and _lower_is_better(n, t) and t.get("base") is not None]
    fidelity = _get(report, "accuracy", "fidelity", "top1_agreement")
    if not scored and not lower:
        return None
    plt = _pyplot()
    panels = [p for p in (scored, lower) if p]
    figure, axes = plt.subplots(1, len(panels), figsize=(4 + 2.2 * sum(len(p) for p in panels), 3.4), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        names = [n for n, _ in panel]
        scale = 1 if panel is lower else 100
        base = [scale * t["base"] for _, t in panel]
        pruned = [scale * (t.get("pruned") or 0) for _, t in panel]
        xs = range(len(names))
        for offset, values, label, color in ((-0.2, base, "base", "tab:blue"), (0.2, pruned, "pruned", "tab:orange")):
            bars = axis.bar([x + offset for x in xs], values, 0.4, label=label, color=color)
            axis.bar_label(bars, fmt="%.3g", fontsize=8)
        axis.set_xticks(list(xs), names)
        axis.set_ylabel("lower is better" if panel is lower else "accuracy (%)")
        # Headroom above the bars for the legend and the value labels.
        axis.set_ylim(0, 1.3 * max([*base, *pruned, 1e-9]) if panel is lower else 130)
        if panel is scored:
            axis.set_yticks(range(0, 101, 20))
            if fidelity is not None:
                axis.set_title(f"top-1 agreement with base: {100 * fidelity:.1f} %", fontsize=9)
        axis.legend(fontsize=8, ncol=2, loc="upper center")
        axis.grid(axis="y", alpha=0.3)
    return _png(figure)


def _latency_plot(report: dict[str, Any]) -> bytes | None:
    latency = report.get("latency") or {}
    base, pruned, comparison = latency.get("base") or {}, latency.get("pruned") or {}, latency.get("comparison") or {}
    panels = []
    for phase, field_name, label, scale in (
        ("prefill", "median_s", "prefill median (ms)", 1e3),
        ("decode", "tokens_per_s", "decode tokens/s", 1),
    ):
        keys = [k for k in (base.get(phase) or {}) if k in (pruned.get(phase) or {})]
        keys = [k for k in keys if base[phase][k].get(field_name) is not None and pruned[phase][k].get(field_name) is not None]
        if keys:
            panels.append((phase, field_name, label, scale, keys))
    if not panels:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.6), squeeze=False)
    for axis, (phase, field_name, label, scale, keys) in zip(axes[0], panels):
        xs = range(len(keys))
        b = [scale * base[phase][k][field_name] for k in keys]
        p = [scale * pruned[phase][k][field_name] for k in keys]
        axis.bar([x - 0.2 for x in xs], b, 0.4, label="base", color="tab:blue")
        bars = axis.bar([x + 0.2 for x in xs], p, 0.4, label="pruned", color="tab:orange")
        speedups = [_get(comparison, phase, k, "speedup") for k in keys]
        axis.bar_label(bars, labels=[_times(s) if s else "" for s in speedups], fontsize=8)
        axis.set_xticks(list(xs), [_workload(base[phase][k], k).replace(", ", "\n", 1) for k in keys], fontsize=8)
        axis.set_ylabel(label)
        axis.set_title(f"{phase} (bars: pruned speedup)", fontsize=10)
        axis.set_ylim(0, 1.3 * max([*b, *p, 1e-9]))
        axis.legend(fontsize=8, ncol=2, loc="upper center")
        axis.grid(axis="y", alpha=0.3)
    return _png(figure)


def render_plots(report: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes per plot name (``redundancy``, ``accuracy``, ``latency``) for what is present."""
    plots = {"redundancy": _redundancy_plot(report), "accuracy": _accuracy_plot(report), "latency": _latency_plot(report)}
    return {name: png for name, png in plots.items() if png is not None}
