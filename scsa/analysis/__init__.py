"""Analysis of trained runs: comparisons over seeds, attention maps, throughput, checkpoint loading."""
