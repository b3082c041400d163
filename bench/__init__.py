"""Load generation, peer comparison and micro-benchmarks (see bench/RESULTS.md)."""
