"""`dfs` on a closed pipe stops quietly, as Unix tools do (`dfs stat /f | head -1`)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

from tests.cluster_procs import BIN, ProcCluster
from tests.conftest import random_file


def test_every_printing_command_is_quiet_on_a_closed_pipe(
    cluster: ProcCluster, tmp_path: Path
) -> None:
    cluster.dfs("put", str(random_file(tmp_path / "f", 1000)), "/f")
    dfs = f"{shlex.quote(str(BIN / 'dfs'))} --tracker {cluster.tracker_addr}"
    for command in ["stat /f", "stat --json /f", "ls /", "ls --json /", "status", "fsck"]:
        # `true` exits before dfs has started: every write dfs makes meets a closed pipe.
        result = subprocess.run(
            ["bash", "-c", f"{dfs} {command} | true; echo ${{PIPESTATUS[0]}}"],
            capture_output=True,
            text=True,
            env=cluster.env,
            timeout=60,
        )
        assert result.stderr == "", f"dfs {command}: {result.stderr}"
        assert result.stdout.strip() == "141", f"dfs {command} exited {result.stdout}"
