"""Benchmarks: peer systems measured on the same model and prompts as the FastSwitch serving stack."""
