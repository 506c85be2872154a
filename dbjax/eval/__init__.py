"""Evaluation helpers: the Frechet distance in a cached feature classifier's space
(dbjax.eval.features) and the pictures a person would rather look at (dbjax.eval.plots).
Imported where used, so `import dbjax` loads neither matplotlib nor scipy's linalg."""
