"""Built-in attacks: one module per attack, each registering itself with ``@register_attack``."""
