"""Structured outputs: grammars that constrain sampling token by token (llguidance)."""
