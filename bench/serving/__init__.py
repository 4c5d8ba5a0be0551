"""Serving many adapters on one base model: the S-LoRA-style engine (engine.py) and the benchmark
against merge-and-switch, peft's mixed batch and one merged model (serve_bench.py)."""
