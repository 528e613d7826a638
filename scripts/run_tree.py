"""Run the seseme CLI from another source tree (an older commit's src/, for an A/B in one device call).

An editable install's import hook (scikit-build-core's redirecting finder) sits before the path finder, so
PYTHONPATH alone still imports the installed tree: this drops the hook, puts SRC first and runs the CLI. SRC's
seseme_cli needs the compiled kernels module copied beside it (the .so of the installed build).
Usage: python3 scripts/run_tree.py SRC [seseme arguments...]
  e.g. git archive OLD src/seseme_cli | tar -x -C /tmp/base; cp <installed _kernels*.so> /tmp/base/src/seseme_cli/
       python3 scripts/run_tree.py /tmp/base/src bench --model random --batch-sizes 1,64,512
"""

import runpy
import sys

src = sys.argv[1]
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "ScikitBuildRedirectingFinder"]
sys.path.insert(0, src)
sys.argv = ["seseme", *sys.argv[2:]]
import seseme_cli  # noqa: E402

if not seseme_cli.__file__.startswith(src):
    sys.exit(f"run_tree: imported seseme_cli from {seseme_cli.__file__}, not from {src}")
print(f"run_tree: seseme_cli from {seseme_cli.__file__}", file=sys.stderr)
runpy.run_module("seseme_cli", run_name="__main__", alter_sys=True)
