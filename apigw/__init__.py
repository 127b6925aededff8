"""The `apigw` command: one console script for every process, plus process plumbing."""

__version__ = "0.1.0"
