"""Tools around training, each behind a `bin/` script.

Export and merge (`export`), generation and the Chameleons leaderboard (`generate`, `leaderboard`), the peak-memory
estimate and speed plan (`memory`, `speed_plan`), run comparison (`report`); `args` checks their arguments.
"""

from mgmlora.tools.export import build_trained_model, export_adapter, merge_and_save, read_run_adapter
from mgmlora.tools.generate import GenerationArgs, generate_batch
from mgmlora.tools.memory import estimate, run_from_tree
from mgmlora.tools.report import compare
from mgmlora.tools.speed_plan import candidates

__all__ = ["GenerationArgs", "build_trained_model", "candidates", "compare", "estimate", "export_adapter",
           "generate_batch", "merge_and_save", "read_run_adapter", "run_from_tree"]
