"""`ember run` start-up: what the CLI imports before the guest runs.

In the rig the interpreter runs emulated and every module costs tens of
milliseconds, so libraries needed only by other commands stay out of this path.
"""

from __future__ import annotations

import subprocess
import sys

RUN_PATH = "import ember.cli, ember.config, ember.images, ember.machine"


def loaded_after(code: str) -> set[str]:
    probe = f"{code}; import sys; print(' '.join(sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_run_path_leaves_rich_unloaded():
    """rich draws image-build progress only; a run with cached images never builds."""
    assert not {name for name in loaded_after(RUN_PATH) if name.split(".")[0] == "rich"}


def test_a_build_progress_line_still_loads_rich():
    code = "from ember.images.progress import BuildProgress; BuildProgress('t', enabled=True)"
    assert "rich.progress" in loaded_after(code)
