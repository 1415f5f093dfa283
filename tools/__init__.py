"""Command-line tools around the trainer (make_shards, profile, demo, ...).

Run as a script (`python tools/NAME.py`), this folder is sys.path[0]: tools/profile.py, found there as `profile`,
hands that name over to the standard library's module (which cProfile needs). Imports within the project go
through the installed package, `pirl_trainer.tools`.
"""
