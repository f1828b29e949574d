"""DynPose throughput benchmark (`dynpose-bench`): crops/s of large-only, small-only and DynPose at routing
fractions, and the end-to-end pipeline on real images with a per-stage time breakdown.

`timing` (round-robin timing, machine facts, inputs), `crops` (the Dispatcher benchmark), `pipeline` (end to end),
`report` (table and plot), `run` (`run_benchmark`: the whole run from an engine dir).
"""

from dynpose.bench.report import plot, summary_lines
from dynpose.bench.run import DEFAULT_FRACTIONS, DEFAULTS, run_benchmark
from dynpose.bench.timing import parse_batches, parse_fractions

__all__ = ["DEFAULTS", "DEFAULT_FRACTIONS", "parse_batches", "parse_fractions", "plot", "run_benchmark", "summary_lines"]
