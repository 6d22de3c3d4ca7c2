"""Plumbing every layer shares: typed errors, command-line helpers, output ownership."""
