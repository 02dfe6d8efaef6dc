#!/bin/sh
# Optional: compile vnvme's hot path (the vfio-user message path and the controller core) with
# mypyc, in place: each module's extension lands next to its .py, and Python imports the
# extension first. The pure-Python source stays the reference and the fallback:
#   scripts/build_mypyc.sh           build (needs mypy and a C compiler)
#   scripts/build_mypyc.sh --clean   remove the extensions: pure Python again
# Rebuild after editing a compiled module, or the stale extension shadows the edit
# (python benchmarks/hotpath.py prints which build it measured).
set -eu
cd "$(dirname "$0")/../src"

MODULES="
vnvme/vfio_user/protocol.py
vnvme/vfio_user/server.py
vnvme/controller/controller.py
vnvme/controller/processing.py
vnvme/controller/doorbell_writes.py
vnvme/controller/doorbells.py
vnvme/controller/eventidx.py
vnvme/controller/interrupts.py
vnvme/controller/queues.py
vnvme/controller/nvm.py
vnvme/memory.py
vnvme/function.py
"
# Not fence.py: compiled, doorbells.py would call it directly, past the tests that slow the
# probe's fence down (through doorbells.full_fence) to race the host against it.

clean() {
    # Every extension under vnvme, not just this list's: one left from a longer list would
    # shadow its .py and import a shared library that is gone.
    find vnvme -name '*.cpython-*.so' -delete
    rm -f ./*__mypyc.cpython-*.so
    rm -rf build
}

clean
if [ "${1:-}" = "--clean" ]; then
    exit 0
fi
# shellcheck disable=SC2086 # one argument per module
mypyc $MODULES
rm -rf build
