# -*- test-case-name: tests.test_childprocess -*-
"""
How a child Python process (a C{twistd postcopy} daemon, a guest worker)
imports the very C{twisted_postcopy} its parent imported.

C{python -c ...} and C{python -m ...} put the current directory first on
C{sys.path}.  Run from inside a checkout (where the cffi extension was
never built), a child would import the checkout's C{twisted_postcopy}
instead of the installed one and fail with C{No module named
'twisted_postcopy.ram._uffd'}.  So every child runs with C{-P} (Python
3.11's safe path: no current directory on C{sys.path}) and, unless the
package came from a site directory the child searches anyway, with the
directory the parent imported it from first on C{PYTHONPATH}.
"""

from __future__ import annotations

import os
import site
import sys
from pathlib import Path

import twisted_postcopy

#: The directory holding the C{twisted_postcopy} package this process
#: imported (a checkout, or a site-packages directory), which also holds
#: C{twisted/plugins/twisted_postcopy_plugin.py}.
IMPORT_ROOT = Path(twisted_postcopy.__file__).resolve().parent.parent


def pythonArguments(*arguments: str) -> list[str]:
    """
    The argument vector of a child Python process.

    @param arguments: what follows the interpreter's own options
        (C{"-m", MODULE, ...} or C{"-c", CODE, ...}).
    @return: C{[sys.executable, "-P", *arguments]}.
    """
    return [sys.executable, "-P", *arguments]


def _siteDirectories() -> set[Path]:
    """
    @return: the site directories a child interpreter searches by itself.
    """
    directories = list(site.getsitepackages())
    if site.ENABLE_USER_SITE:
        directories.append(site.getusersitepackages())
    return {Path(directory).resolve() for directory in directories}


def childEnvironment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """
    The environment of a child Python process: C{environ} with
    L{IMPORT_ROOT} first on C{PYTHONPATH}, unless it is there already or
    is a site directory (which the child searches after C{PYTHONPATH}, as
    the parent did).

    @param environ: the base environment (default: C{os.environ}).
    @return: a new environment.
    """
    env = dict(os.environ if environ is None else environ)
    paths = [entry for entry in env.get("PYTHONPATH", "").split(os.pathsep) if entry]
    if IMPORT_ROOT in _siteDirectories():
        return env
    if paths and Path(paths[0]).resolve() == IMPORT_ROOT:
        return env
    env["PYTHONPATH"] = os.pathsep.join([str(IMPORT_ROOT), *paths])
    return env
