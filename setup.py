"""Only here to put ``whisper_accel.pth`` at the top of site-packages (setuptools has no
declarative way to do that). Everything else is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py


class build_py_with_pth(build_py):
    def run(self):
        super().run()
        self.copy_file("whisper_accel.pth", os.path.join(self.build_lib, "whisper_accel.pth"))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, "whisper_accel.pth")]


setup(cmdclass={"build_py": build_py_with_pth})
