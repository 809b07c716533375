"""The smile model zoo: methods from related papers, each training through ``smile.runtime``.

Installed as ``smile.models``; one sub-package per method. Importing a method's package
registers it in :mod:`smile.models.registry` (cheaply: its heavy modules load on use), so
importing ``smile.models`` fills the registry with the whole zoo.
"""

from smile.models import lemda, peft_design_spaces, trap_replace  # noqa: F401  (each registers itself)
