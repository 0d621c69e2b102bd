"""HTTP interface: the OpenAI-compatible API (and later the web app)."""
