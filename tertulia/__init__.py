"""Tertulia: a self-hosted ChatGPT you own."""

__version__ = "0.1.0"
