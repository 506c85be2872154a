"""Benchmarks (python -m benchmarks.<name>): memory, speed, scaling and transfers of the
train step, the accelerator check and the soak test. Each prints a table and writes its
JSON, by default under benchmarks/results/."""
import experiments  # noqa: F401  (its Ctrl-C guard for a command that is still starting)
