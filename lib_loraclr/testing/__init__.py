"""Tiny models and synthetic LoRAs in the real formats, for tests, the demo and benchmarks."""
