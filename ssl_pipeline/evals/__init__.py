"""Evaluations of a backbone: pure functions of cached features, or short supervised runs."""
