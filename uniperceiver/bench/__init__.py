"""Speed and memory benchmarks (`upctl bench`): warm-up, repeats, medians, ratios in one run."""
