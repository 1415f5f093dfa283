"""Command-line tools around the trainer (make_shards, profile, demo, ...).

Run as a script (`python tools/NAME.py`), this folder is sys.path[0], where tools/profile.py would shadow the
standard library's `profile` module, which cProfile (imported by torch) needs. The project is installed, so
`tools.*` imports do not need that entry: the first `import tools...` of a script removes it, before torch loads.
"""
import os
import sys

if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
