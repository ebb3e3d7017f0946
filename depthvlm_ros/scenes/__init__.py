"""Procedural scenes with exact ground truth: ray-cast rooms and streets, labels, spatial QA."""
