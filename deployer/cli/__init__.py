"""`deploy`, the command line: one module per command group; `main` is the one place that prints an error and
picks the exit code.
"""
