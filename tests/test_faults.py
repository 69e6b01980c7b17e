"""The fault matrix through a real ComfyUI server (main.py --cpu, 2 CPU ranks): a rank killed or stopped,
or Ray's own processes killed, at each moment of a worker group's life, and ComfyUI's interrupt. Every
prompt gives ComfyUI's own latent, the next is routed again, nothing is left behind (tools/faults.py,
which also writes docs/reliability.md's table)."""
import pytest

from comfy_xdit_patch.tools import faults


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fault_matrix(tmp_path, router):
    router.close_group()  # 2 cores: the server's ranks get them to themselves
    matrix = faults.run(str(tmp_path))
    print(faults.table(matrix.rows))
    assert [r.case for r in matrix.rows if not r.ok] == [], faults.table(matrix.rows)
    assert len(matrix.rows) == len(faults.CASES)
    assert matrix.after_exit == [], "processes outlived ComfyUI"
