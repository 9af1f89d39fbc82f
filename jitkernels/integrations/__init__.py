"""Integrations with FL frameworks. Each submodule imports its framework lazily, so jitkernels never needs it."""
