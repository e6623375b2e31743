"""Tools the test suite and the benchmark share, run as scripts or imported."""
