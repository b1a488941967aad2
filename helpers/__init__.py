"""Helpers for the memory-efficient LLM course: models, data, measurement, prediction, checks."""
