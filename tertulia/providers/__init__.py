"""Providers: where replies come from, behind one contract (`base`): Tertulia's own engine (`local`)
or another OpenAI-compatible server (`remote`); the sampling options every entry point checks
(`options`)."""
