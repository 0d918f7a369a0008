"""Work on a fleet: the fan-out, the push stages and their plan, smoke and model checks, rollback, collect and
install.
"""
