"""Command-line entry points: train, evaluate, plot. Thin: no algorithm logic here."""
