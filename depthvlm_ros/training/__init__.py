"""The two-stage trainer (+ stage 0 for the tiny model) and its data loading."""
