"""Providers: where replies come from (the local engine, later remote OpenAI-compatible servers)."""
