"""``vnvme check``: a conformance run against any vfio-user NVMe server, through vnvme's own
vfio-user client and host driver. Importing this package registers every check in
:data:`vnvme.check.registry.CHECKS` (vfio-user, then NVMe, then shadow doorbells)."""

from vnvme.check import dbbuf_checks, nvme_checks, vfio_user_checks
from vnvme.check.registry import CHECKS, Check, Outcome, Verdict

# The order of the imports above is not the run order: declare it here, once.
_GROUPS = ("vfio-user", "nvme", "dbbuf")
CHECKS.sort(key=lambda c: _GROUPS.index(c.group))

__all__ = ["CHECKS", "Check", "Outcome", "Verdict", "dbbuf_checks", "nvme_checks", "vfio_user_checks"]
