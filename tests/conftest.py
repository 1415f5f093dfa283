pytest_plugins = ["tests.require_all"]
