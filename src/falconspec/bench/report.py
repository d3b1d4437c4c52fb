"""Benchmark reports: ``summary.json``, ``summary.md`` and PNG plots (matplotlib, Agg canvas) in the output dir."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from ..machine_load import shared
from .methods import BASELINE, COMPARED_WITH, LLAMACPP_METHODS

PLAIN_METHODS = (BASELINE, "hf", "llamacpp")  # plain decoding: every accepted length is 1, nothing to plot

LEGEND = """\
Columns (one row per dataset and method; the baseline is `greedy`, plain decoding in the same engine, same dtype
and temperature, same run; a prompt is all turns of one question):

- **speed-up median [95% CI]**: median over prompts of (method tokens/s) / (greedy tokens/s), with a 95% bootstrap
  interval from resampling prompts;
- **speed-up overall [95% CI]**: (method total tokens / total seconds) / (the same for greedy), same interval;
- **tokens/s**: new tokens (EOS excluded, at most max-new-tokens per turn) per second of wall time, prefill included
  (our engine's time also includes its incremental detokenization for streaming; `generate` does none);
- **τ with / without bonus**: mean committed tokens per verification forward (Spec-Bench's `accept_lengths`;
  plain decoding = 1.00), and the same minus the bonus token (accepted draft tokens per forward, Falcon's τ);
- **acceptance**: accepted / drafted tokens (our engine only: Hugging Face `generate` does not expose drafts);
- **identical**: prompts whose tokens equal greedy's exactly: greedy runs, and sampled runs of our engine's methods
  (plain decoding with the same seed draws the same tokens) but not of other engines (bf16 verification batches
  rows and may round differently, so < 100% is expected there; in float32 anything below 100% is a bug);
- **draft / verify**: shares of wall time spent drafting and verifying (our engine only; the rest is prefill,
  detokenization and bookkeeping);
- **plan**: the tree budgets the planner chose (nodes with the root / drafting depth; `plain` = it expected no tree
  to beat plain decoding and decoded plainly; `fixed` = a budget given by hand), by share of verification cycles;
- **= fp32 greedy / tokens before divergence** (bf16 and fp16 greedy runs): prompts whose every answer token is
  the float32 model's argmax (teacher-forced, `bench/reference.py`), and the mean tokens per turn before the first
  token that differs; plain decoding in the same dtype is the row to compare against;
- **peak RSS**: the process's resident memory peak while the method answered (weights of the target included);
- **drafter params**: parameters of the drafter or draft model (the truncated hf-assisted copy shares the target's
  tensors, so it costs no extra memory).
"""


LLAMACPP_LEGEND = """
llama.cpp rows (xllamacpp {version}: llama.cpp's server in this process, with as many threads as torch, on the
target's GGUF file as it is, quantized weights times 8-bit quantized activations, so its answers are not our float32
engine's):

- **llamacpp (vs greedy)**: llama.cpp's plain decoding, its speed-up over our `greedy` and the prompts where its
  tokens equal greedy's (< 100% is expected: the arithmetic differs);
- **llamacpp-ngram / llamacpp-eagle3 (vs llamacpp)**: llama.cpp's n-gram speculation (`ngram-simple`) and EAGLE-3
  speculation (`draft-eagle3`, the `--llamacpp-draft` GGUF), their speed-up over `llamacpp` and the prompts whose
  tokens equal its own; the tokens/s column compares any two rows;
- llama.cpp reports drafted and accepted tokens (acceptance) but not the tokens committed per verification
  forward, so τ is not shown for its speculative methods, and it splits no time into drafting and verifying.
"""


def write_report(out: str | Path, summary: dict) -> list[Path]:
    """Write summary.json, summary.md and the plots (none in batch mode); returns the files written."""
    out = Path(out)
    files = [out / "summary.json", out / "summary.md"]
    files[0].write_text(json.dumps(summary, indent=1, default=str))
    if summary.get("mode") == "batch":  # the batched throughput benchmark: no plots
        from .batch import batch_markdown

        files[1].write_text(batch_markdown(summary))
        return files
    files[1].write_text(markdown(summary))
    return files + plot(out / "plots", summary["rows"])


# ---------------------------------------------------------------------------------------------- markdown
def header(summary: dict, title: str) -> list[str]:
    """A report's first lines: title, when and on what machine, a warning if it was contended, the command."""
    env = summary["environment"]
    start, end = env["start"], env.get("end", env["start"])
    lines = [f"# {title}", "",
             f"{start['time']} to {end['time']} on {start['cpu'] or start['platform']} ({start['cpu_count']} cores, "
             f"{start['torch_threads']} torch threads), torch {start['torch']}, transformers {start['transformers']}, "
             f"falconspec {start['falconspec']}. Load average at start {_load(start)}, at end {_load(end)}."
             + _others_line(env.get("other_processes")), ""]
    if contended(start, end, env.get("other_processes")):
        lines += ["> **Contended machine**: other processes used the CPU during the run, so these timings are not "
                  "results.", ""]
    if summary.get("command"):
        lines += [f"Command: `{summary['command']}`", ""]
    return lines


def markdown(summary: dict, legend: bool = True) -> str:
    config = summary["config"]
    lines = header(summary, f"falconspec bench: {config['model']}")
    lines += [f"max-new-tokens {config['max_new_tokens']}, seed {config['seed']}, device {config['device']}.", ""]
    for entry in summary["datasets"]:
        skipped = entry.get("skipped_too_long") or []
        note = f"; {len(skipped)} skipped as too long for the context: {skipped}" if skipped else ""
        lines.append(f"- **{entry['name']}**: {entry['prompts']} prompts from `{entry['source']}`{note}")
    lines += [""] + _drafters(summary["rows"]) + _product_paths(summary["environment"].get("product_paths", {}))
    for (dtype, temperature), rows in _by_setting(summary["rows"]).items():
        mode = "greedy" if temperature == 0 else f"sampling, temperature {temperature:g}"
        lines += [f"## {dtype}, {mode}", "", _table(rows), ""]
        lines += _not_run(rows) + [""]
    llamacpp = any(r["method"] in LLAMACPP_METHODS and r["status"] == "ok" for r in summary["rows"])
    start = summary["environment"]["start"]
    legend_text = LEGEND + (LLAMACPP_LEGEND.format(version=start.get("xllamacpp") or "?") if llamacpp else "")
    return "\n".join(lines + ([legend_text] if legend else []))


def contended(start: dict, end: dict, others: dict | None = None) -> bool:
    """Did other work share the CPU? As measured during the run (:func:`~falconspec.machine_load.shared`); without
    that measurement (older summaries, no ``/proc/stat``), the 1-minute load average: at the end less the
    benchmark's own torch threads, at the start what ran just before; half the cores or more is too much."""
    cores = start["cpu_count"]
    if others:
        return shared(others, cores)
    others_at_end = end["load_average"][0] - end["torch_threads"]
    return max(start["load_average"][0], others_at_end) >= 0.5 * cores + 0.5


def _others_line(others: dict | None) -> str:
    if not others:
        return ""
    return (f" Other processes used {others['mean_cores']:.2f} cores on average, {others['max_cores']:.2f} in the "
            f"busiest {others['interval_s']:g} s.")


def _not_run(rows: list[dict]) -> list[str]:
    """One line per skipped or failed method and reason, naming the datasets it concerns."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for r in rows:
        if r["status"] != "ok":
            groups[(r["method"], r["status"], r["reason"])].append(r["dataset"])
    return [f"- **{method}** {status} ({', '.join(datasets)}): {reason}"
            for (method, status, reason), datasets in groups.items()]


def _drafters(rows: list[dict]) -> list[str]:
    """One line per trained drafter that ran: its checkpoint directory and the start of its weights' sha256."""
    seen = {}
    for r in rows:
        if r.get("drafter"):
            seen.setdefault(r["method"], r["drafter"])
    lines = [f"- drafter **{method}**: `{d['path']}` ({d.get('file', 'model.safetensors')} sha256 "
             f"{(d['weights_sha256'] or '?')[:12]})" for method, d in seen.items()]
    return lines + [""] if lines else []


def _product_paths(by_dtype: dict) -> list[str]:
    """Which product path the few-row forwards took per dtype, with the measured cost of each as a multiple of a
    stock one-row forward (``kernels.py``, ``calibrate.py``; a plain step may take another path too)."""
    lines = []
    for dtype, paths in by_dtype.items():
        calibration = paths.get("calibration")
        if calibration is None:
            continue
        # results before the oneDNN path name the few-row sizes alone
        by_path = paths.get("sizes_by_path", {"few-row": paths.get("few_row_sizes", [])})
        taken = (", ".join(f"{path} at n = {sizes}" for path, sizes in by_path.items() if sizes) + ", stock otherwise"
                 if any(by_path.values()) else "stock at every n")
        curves = calibration["verify_ms"]
        one = curves["stock"][0]
        costs = "; ".join(f"{path} " + " / ".join(f"{ms / one:.2f}" for ms in curve) for path, curve in curves.items())
        lines.append(f"- product paths, {dtype}: {taken}; measured "
                     f"forward cost over n = {calibration['sizes']} nodes, x a stock one-row step: {costs}"
                     + (" (calibrated on a busy machine)" if calibration.get("busy") else ""))
    return lines + [""] if lines else []


def _load(env: dict) -> str:
    return " / ".join(f"{x:.2f}" for x in env["load_average"])


COLUMNS = ("dataset", "method", "speed-up median [95% CI]", "speed-up overall [95% CI]", "tokens/s",
           "τ with bonus", "τ without", "acceptance", "identical", "draft / verify", "plan (share of cycles)",
           "peak RSS MB", "drafter params")
REFERENCE_COLUMNS = ("= fp32 greedy", "tokens before divergence")


def _table(rows: list[dict]) -> str:
    reference = any(r.get("fp32_agreement") for r in rows)
    columns = COLUMNS + (REFERENCE_COLUMNS if reference else ())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if r["status"] != "ok":
            cells = [r["dataset"], r["method"], r["status"]] + ["–"] * (len(columns) - 3)
        else:
            cells = [r["dataset"], _method(r), *_speedup_cells(r), _num(r["tokens_per_s"], ".1f"),
                     _num(r["mean_accepted_length"], ".2f"), _num(r["mean_accepted_drafts"], ".2f"),
                     _pct(r["acceptance_rate"]), _identical(r), _shares(r), _plans(r),
                     _num(r["peak_rss_mb"], ".0f"), f"{r['drafter_params']:,}"]
            if reference:
                cells += _agreement(r.get("fp32_agreement"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _method(row: dict) -> str:
    """The method's name, with the method it is compared with when ``COMPARED_WITH`` names one (llama.cpp's)."""
    compared = COMPARED_WITH.get(row["method"])
    return f"{row['method']} (vs {compared})" if compared else row["method"]


def _plans(row: dict) -> str:
    """The planned budgets by share of verification cycles, e.g. ``4n/d2 81%, 6n/d3 19%``."""
    plans = row.get("plan_cycles")
    if not plans or row["method"] == BASELINE:
        return "–"
    total = sum(plans.values())
    return ", ".join(f"{k} {v / total:.0%}" for k, v in list(plans.items())[:3])


def _agreement(agreement: dict | None) -> list[str]:
    if not agreement:
        return ["–", "–"]
    return [f"{agreement['identical']}/{agreement['prompts']}", _num(agreement["mean_prefix_tokens"], ".1f")]


def _speedup_cells(row: dict) -> list[str]:
    if row["method"] == BASELINE:
        return ["1.00 (baseline)", "1.00 (baseline)"]
    s = row["speedup"]
    return [f"{_num(s['median'], '.2f')} [{_num(s['median_ci'][0], '.2f')}, {_num(s['median_ci'][1], '.2f')}]",
            f"{_num(s['overall'], '.2f')} [{_num(s['overall_ci'][0], '.2f')}, {_num(s['overall_ci'][1], '.2f')}]"]


def _identical(row: dict) -> str:
    same = row["identical_to_greedy"]
    if row["method"] == BASELINE:
        return "baseline"
    if same is None:
        return "n/a (sampling)"
    return f"{same['rate']:.0%} ({same['count']}/{row['prompts']})"


def _shares(row: dict) -> str:
    if row["draft_time_share"] is None:
        return "–"
    return f"{row['draft_time_share']:.0%} / {row['verify_time_share']:.0%}"


def _num(value, fmt: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _by_setting(rows: list[dict]) -> dict[tuple[str, float], list[dict]]:
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["dtype"], row["temperature"])].append(row)
    return groups


# ---------------------------------------------------------------------------------------------- plots
def plot(plot_dir: Path, rows: list[dict]) -> list[Path]:
    """Per (dtype, temperature): speed-up per method per dataset, and the distribution of accepted lengths."""
    plot_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for (dtype, temperature), group in _by_setting(rows).items():
        ok = [r for r in group if r["status"] == "ok"]
        tag = f"{dtype}-t{temperature:g}"
        title = f"{dtype}, " + ("greedy" if temperature == 0 else f"T={temperature:g}")
        files.append(_speedup_plot(plot_dir / f"speedup-{tag}.png", ok, title))
        files.append(_accept_plot(plot_dir / f"accept-lengths-{tag}.png", ok, title))
    return files


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg, never through pyplot's global backend
    return figure


def _speedup_plot(path: Path, rows: list[dict], title: str) -> Path:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    figure = _figure(max(6.0, 1.2 * len(methods) * len(datasets) ** 0.5 + 2), 4.0)
    ax = figure.add_subplot()
    width = 0.8 / max(len(datasets), 1)
    for d, dataset in enumerate(datasets):
        cells = {r["method"]: r["speedup"] for r in rows if r["dataset"] == dataset}
        xs = [m + (d - (len(datasets) - 1) / 2) * width for m in range(len(methods))]
        medians = [cells[m]["median"] if m in cells else math.nan for m in methods]
        low = [med - cells[m]["median_ci"][0] if m in cells else 0 for m, med in zip(methods, medians)]
        high = [cells[m]["median_ci"][1] - med if m in cells else 0 for m, med in zip(methods, medians)]
        ax.bar(xs, medians, width, yerr=[low, high], capsize=3, label=f"{dataset} (median, 95% CI)")
        overall = [cells[m]["overall"] if m in cells else math.nan for m in methods]
        ax.plot(xs, overall, "k_", markersize=12, label="overall" if d == 0 else None)
    ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    labels = [f"{m}\n(vs {COMPARED_WITH[m]})" if m in COMPARED_WITH else m for m in methods]
    ax.set_xticks(range(len(methods)), labels, rotation=20)
    ax.set_ylabel("speed-up over greedy" + (" (or the method named)" if labels != methods else ""))
    ax.set_title(f"Speed-up per method ({title})")
    ax.legend(fontsize="small")
    figure.savefig(path, dpi=110)
    return path


def _accept_plot(path: Path, rows: list[dict], title: str) -> Path:
    pooled: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for r in rows:
        if r["method"] not in PLAIN_METHODS:
            for length, count in r["accept_length_histogram"].items():
                pooled[r["method"]][int(length)] += count
    figure = _figure(6.5, 4.0)
    ax = figure.add_subplot()
    width = 0.8 / max(len(pooled), 1)
    for i, (method, histogram) in enumerate(pooled.items()):
        total = sum(histogram.values())
        lengths = sorted(histogram)
        xs = [n + (i - (len(pooled) - 1) / 2) * width for n in lengths]
        ax.bar(xs, [histogram[n] / total for n in lengths], width, label=method)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if not pooled:
        ax.text(0.5, 0.5, "no drafting method ran", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("tokens committed per verification forward (bonus included)")
    ax.set_ylabel("share of forwards")
    ax.set_title(f"Accepted lengths, all datasets ({title})")
    if pooled:
        ax.legend(fontsize="small")
    figure.savefig(path, dpi=110)
    return path
