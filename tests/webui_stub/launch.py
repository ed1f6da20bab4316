"""Mirror of launch.is_installed / launch.run_pip (records what would be installed)."""

import importlib.util

installed_by_run_pip = []


def is_installed(package):
    return importlib.util.find_spec(package) is not None


def run_pip(command, desc=None, live=False):
    installed_by_run_pip.append(command)
