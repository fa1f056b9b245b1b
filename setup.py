"""Builds the ONNX Runtime custom-op library (vila_edge/ops/csrc) into the package; pyproject.toml
holds everything else. `pip install .`, `pip install -e .` and wheel builds all compile it.

ORT's C/C++ API headers are not in the onnxruntime wheel: they come from Debian's
libonnxruntime-dev package (checked against its SHA-256), or from ORT_INCLUDE_DIR (a directory
holding onnxruntime_c_api.h, e.g. an ONNX Runtime release or JetPack's headers). Version 1.21's
C API (ORT_API_VERSION 21) loads into any onnxruntime >= 1.21 (pyproject.toml pins that).
"""
import hashlib
import io
import lzma
import os
import tarfile
import urllib.request

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ORT_DEB = ("http://deb.debian.org/debian/pool/main/o/onnxruntime/libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb",
           "14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
HEADERS_IN_DEB = "./usr/include/onnxruntime/"
HEADERS_DIR = os.path.join("build", "ort-headers-1.21.0")      # git-ignored (/build/)


def _ar_member(blob: bytes, name: str) -> bytes:
    """One member of a Debian package (an `ar` archive: 8-byte magic, then 60-byte headers + data)."""
    if not blob.startswith(b"!<arch>\n"):
        raise RuntimeError("not an ar archive")
    at = 8
    while at + 60 <= len(blob):
        member, size = blob[at:at + 16].decode().strip().rstrip("/"), int(blob[at + 48:at + 58])
        if member == name:
            return blob[at + 60: at + 60 + size]
        at += 60 + size + size % 2
    raise RuntimeError(f"{name} not found in the package")


def ort_headers() -> str:
    """The directory of ORT's API headers: ORT_INCLUDE_DIR, or Debian's, fetched once into build/."""
    if os.environ.get("ORT_INCLUDE_DIR"):
        return os.environ["ORT_INCLUDE_DIR"]
    if os.path.exists(os.path.join(HEADERS_DIR, "onnxruntime_c_api.h")):
        return HEADERS_DIR
    url, sha = ORT_DEB
    print(f"fetching ONNX Runtime's C API headers from {url}")
    blob = urllib.request.urlopen(url, timeout=120).read()
    if hashlib.sha256(blob).hexdigest() != sha:
        raise RuntimeError(f"{url}: SHA-256 mismatch; set ORT_INCLUDE_DIR to a directory of ORT's headers")
    tmp = HEADERS_DIR + ".tmp"
    os.makedirs(tmp, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(lzma.decompress(_ar_member(blob, "data.tar.xz")))) as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith(HEADERS_IN_DEB):
                m.name = m.name[len(HEADERS_IN_DEB):]
                tar.extract(m, tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extract(m, tmp)
    os.replace(tmp, HEADERS_DIR)
    return HEADERS_DIR


class BuildOrtOps(build_ext):
    def build_extensions(self):
        include = ort_headers()
        for ext in self.extensions:
            ext.include_dirs.append(include)
        super().build_extensions()

    def get_export_symbols(self, ext):
        return ["RegisterCustomOps"]     # an ORT op library, not a Python module: no PyInit_*


setup(
    ext_modules=[Extension(
        "vila_edge.ops._vila_edge_ops", ["vila_edge/ops/csrc/paged_attention.cc"], language="c++",
        depends=["vila_edge/ops/csrc/attention_kernels.h", "vila_edge/ops/csrc/swiglu.h"],
        # Portable flags: the wheel runs on any x86-64 or aarch64 (Jetson) CPU, no -march=native.
        extra_compile_args=["-std=c++17", "-O3", "-g0", "-fvisibility=hidden"])],
    cmdclass={"build_ext": BuildOrtOps},
)
