"""Studies (python -m studies.<name>): one-off questions about the method, each answered
by a command whose output is under studies/results/ (probes of trained chains, the exact
denoiser's chain, the text-quality curves)."""
import experiments  # noqa: F401  (its Ctrl-C guard for a command that is still starting)
