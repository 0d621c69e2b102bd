"""Evaluation: perplexity and other measures of a model's quality."""
