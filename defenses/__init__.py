"""Built-in defenses: ``none/`` (NONE) and ``baselines/`` (one module per defense)."""
