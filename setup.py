"""The build step the wheel needs: copy the front-end sources (``widgets/``) and the kernelspec files (``kernel/``)
from the top of the repository into the package, as ``nnsight_magic/_bundled/...`` (see nnsight_magic/widgets/
assets.py). Everything else is in pyproject.toml. An editable install reads the repository's folders directly.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
FOLDERS = ("widgets", "kernel")


class BuildWithAssets(build_py):
    """``build_py``, then the top-level folders copied into the built package."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:
            return
        for folder in FOLDERS:
            target = Path(self.build_lib) / "nnsight_magic" / "_bundled" / folder
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(ROOT / folder, target)


setup(cmdclass={"build_py": BuildWithAssets})
