"""Integrations with other frameworks (optional dependencies; the model core never imports these)."""
