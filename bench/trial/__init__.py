"""One trial's work: the training loop (train.py), what it measures (measure.py), the lm-eval and
forgetting scores (evaluate.py), the memory forecast made before it runs (forecast.py), and the
test-only injected slowdowns (inject.py)."""
