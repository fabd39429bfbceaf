"""Build the compiled hot paths: every `_native/*.pyx` becomes `oisp._native.<name>`,
and `_native/divert_cffi_build.py` generates the cffi (ABI mode) divert binding."""

import runpy
import shutil
import sys
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

HERE = Path(__file__).parent

if sys.platform == "win32":
    COMPILE_ARGS = ["/O2"]
else:
    COMPILE_ARGS = ["-O3", "-fno-strict-aliasing"]

# tls_relay resolves OpenSSL with dlopen/dlsym, in libdl before glibc 2.34 (manylinux_2_28).
LIBRARIES = {"tls_relay": ["dl"]} if sys.platform.startswith("linux") else {}


def emit_divert_binding() -> None:
    """Write the out-of-line ABI-mode cffi module into the package tree, so regular
    and editable installs both carry it (cffi's own setuptools hook skips editable
    installs in ABI mode)."""
    ffibuilder = runpy.run_path(str(HERE / "_native" / "divert_cffi_build.py"))["ffibuilder"]
    ffibuilder.emit_python_code(str(HERE / "oisp" / "_native" / "_divert_cffi.py"))


def copy_pinned_backends() -> None:
    """Ship deps/backends.json (the one list of backend hashes) inside the package."""
    shutil.copyfile(HERE / "deps" / "backends.json", HERE / "oisp" / "divert" / "pinned_backends.json")


emit_divert_binding()
copy_pinned_backends()

extensions = [
    Extension(
        f"oisp._native.{pyx.stem}",
        [str(pyx.relative_to(HERE).as_posix())],
        include_dirs=[numpy.get_include(), "_native"],
        # Headers included from other headers are invisible to Cython's dependency scan.
        depends=[str(h.relative_to(HERE).as_posix()) for h in sorted((HERE / "_native").glob("*.h"))],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        extra_compile_args=COMPILE_ARGS,
        libraries=LIBRARIES.get(pyx.stem, []),
    )
    for pyx in sorted((HERE / "_native").glob("*.pyx"))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
