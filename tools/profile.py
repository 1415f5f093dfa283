"""Throughput profiling from the command line; the subcommands, their options and code are in tools/profiling/cli.py.

    python tools/profile.py --help
"""
import sys

if __name__ == "profile":
    # Run as a script, tools/ is sys.path[0], so `import profile` finds this file, and cProfile (which torch._dynamo
    # imports) needs the standard library's module of that name. Load that one under the name instead: a module
    # that replaces itself in sys.modules while it is imported is what the import statement returns.
    import importlib.util
    import sysconfig
    from pathlib import Path

    _spec = importlib.util.spec_from_file_location("profile", Path(sysconfig.get_path("stdlib")) / "profile.py")
    _standard = importlib.util.module_from_spec(_spec)
    sys.modules["profile"] = _standard
    _spec.loader.exec_module(_standard)
else:
    from pirl_trainer.tools.profiling.cli import main

    if __name__ == "__main__":
        sys.exit(main())
