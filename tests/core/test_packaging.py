"""A non-editable install (wheel) finds the shipped configs: catalogue, prices and scrub policies."""

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_install_outside_the_checkout_finds_configs(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT), "-w", str(wheels)],
                   check=True, capture_output=True)
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=False)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], check=True, capture_output=True,
                          text=True).stdout.strip()
    # The test environment's packages serve as the wheel's dependencies (no network, no reinstall).
    deps = [p for p in sys.path if p.endswith("site-packages")]
    Path(site, "deps.pth").write_text("\n".join(deps) + "\n")
    [wheel] = wheels.glob("slmconvert-*.whl")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(wheel)], check=True,
                   capture_output=True)
    code = ("import slmconvert, slmconvert.configs as cf, slmconvert.scrub.policy as p, slmconvert.models.catalogue as c, "
            "slmconvert.evaluate.prices as pr; print(slmconvert.__file__); print(cf.configs_dir()); print(len(c.load_catalogue().models));"
            "print(p.load_policy('strict').entities['LOCATION'].action); print(pr.load_prices() is not None)")
    out = subprocess.run([str(py), "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}).stdout.split("\n")
    assert out[0].startswith(str(env_dir)) and "share/slmconvert/configs" in out[1]
    assert int(out[2]) > 10 and out[3] == "replace" and out[4] == "True"
