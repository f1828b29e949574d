"""DynPose throughput benchmark (`dynpose-bench`): crops/s of large-only, small-only, DynPose at routing fractions
and at any routing policy, each against large-only with a 95% interval, the per-crop cost of every model, and the
end-to-end pipeline on real images with a per-stage time breakdown.

`timing` (interleaved rounds until the intervals are tight, solo baselines, machine facts, inputs), `stats` (bootstrap
intervals), `load` (other processes' CPU use), `costs` (per-crop costs for the manifest), `crops` (the configurations
timed: a policy over models, planned and run on the local executor), `pipeline` (end to end), `report` (table and
plot), `options` + `run` (`run_benchmark`).
"""

from dynpose.bench.costs import measure_costs, measure_costs_dir, store_costs
from dynpose.bench.options import DEFAULT_FRACTIONS, DEFAULTS, BenchOptions
from dynpose.bench.report import plot, summary_lines
from dynpose.bench.run import run_benchmark
from dynpose.bench.timing import RoundSpec, parse_batches, parse_fractions

__all__ = [
    "DEFAULTS",
    "DEFAULT_FRACTIONS",
    "BenchOptions",
    "RoundSpec",
    "measure_costs",
    "measure_costs_dir",
    "parse_batches",
    "parse_fractions",
    "plot",
    "run_benchmark",
    "store_costs",
    "summary_lines",
]
