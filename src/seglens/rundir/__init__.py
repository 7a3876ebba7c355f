"""The run directory: its files, its ``RunDir`` and the schema of ``results.json``."""
