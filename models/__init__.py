"""The smile model zoo: methods from related papers, each training through ``smile.runtime``.

Installed as ``smile.models``; one sub-package per method.
"""
