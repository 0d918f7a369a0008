"""The local per-device cache: atomic stores, the admin commands, and reading MACE cache files."""
