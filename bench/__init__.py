"""Throughput and memory benchmark of Phi-3.5-vision fine-tuning: `python -m bench.run --help`."""
