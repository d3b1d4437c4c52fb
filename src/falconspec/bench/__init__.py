"""``falconspec bench``: compare decoding methods on the same prompts, in one process, interleaved per prompt.

``run_bench(BenchConfig(...))`` runs everything and returns the summary; ``write_report(out, summary)`` writes
``summary.json``, ``summary.md`` and the plots. Answer files (Spec-Bench's schema) are written as the run goes.
"""

from .datasets import BenchPrompt, Dataset, load_dataset
from .methods import METHOD_NAMES, MethodOptions, Skipped, TurnResult
from .report import write_report
from .runner import BenchConfig, run_bench

__all__ = ["BenchConfig", "BenchPrompt", "Dataset", "METHOD_NAMES", "MethodOptions", "Skipped", "TurnResult",
           "load_dataset", "run_bench", "write_report"]
