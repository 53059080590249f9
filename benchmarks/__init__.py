"""The service's benchmarks, run from the repository root as modules of this package, e.g.
`python -m benchmarks.serving --quick` (see docs/performance.md)."""

from pathlib import Path

# The checkout the benchmarks measure: its models/, deploy/ and `notsure serve`.
ROOT = Path(__file__).resolve().parents[1]
