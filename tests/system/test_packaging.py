"""The project installs under one namespace (dlorch.*) and the node image's entrypoint is a real command."""

import json
import re
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

from tests.conftest import REPO
from tests.system.harness import dlorch


def test_wheel_installs_into_a_fresh_venv_without_top_level_collisions(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(REPO)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("dlorch-*.whl"))
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops - {"dlorch"} == {f"dlorch-{wheel.name.split('-')[1]}.dist-info"}, tops

    env_dir = tmp_path / "fresh"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    assert (site / "dlorch" / "core" / "spec.py").exists()
    for clash in ("core", "orchestrator", "nodeagent"):
        assert not (site / clash).exists(), f"top-level {clash} in site-packages"
    # Dependencies come from this environment, appended after the fresh site-packages (no .pth processing).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.check_output([str(py), "-c", "import json, dlorch.core.spec as s, dlorch.nodeagent.agent as a;"
                                   "print(json.dumps([s.__file__, a.__file__]))"], text=True)
    assert all(str(site) in f for f in json.loads(out))
    helped = subprocess.run([str(env_dir / "bin" / "dlorch"), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "segment" in helped.stdout


def test_dockerfile_entrypoint_is_the_agent_command():
    text = (REPO / "Dockerfile.node").read_text()
    entry = re.search(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert entry, "Dockerfile.node has no exec-form ENTRYPOINT"
    argv = json.loads(entry.group(1))
    assert argv == ["dlorch", "agent"]
    for src in re.findall(r"^COPY\s+(\S+)", text, re.M):
        assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
    cp = dlorch(*argv[1:], "--help")
    assert "--node-id" in cp.stdout
