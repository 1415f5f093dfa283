"""PIRL network, memory bank and losses: pure tensor code (no file I/O, no config parsing)."""
