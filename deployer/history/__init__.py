"""The nightly runs' history: what every run did on every device, kept in one SQLite file (`history.db`),
and the verdicts of each result against that device's own past (docs/design.md, section 13)."""
