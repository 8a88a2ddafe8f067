"""Build rlhf_kernels and its extension rlhf_kernels._C.

The C++ CPU kernels are always built. The CUDA kernels are added when the
installed torch is a CUDA build (torch.version.cuda) and a CUDA toolkit is
found, unless RLHF_KERNELS_SKIP_CUDA_BUILD=1. MAX_JOBS bounds parallel compile
jobs; TORCH_CUDA_ARCH_LIST picks GPU targets (default "8.0;9.0a").

Install with `pip install --no-build-isolation .` so that the build uses the
torch already installed instead of fetching another one.
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:  # pragma: no cover
        raise RuntimeError(
            "rlhf_kernels builds against an installed torch: install torch first, then "
            "`pip install --no-build-isolation .`"
        ) from exc

    skip_cuda = os.environ.get("RLHF_KERNELS_SKIP_CUDA_BUILD", "0") == "1"
    with_cuda = (
        not skip_cuda and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    )
    sources = ["csrc/ops.cpp", "csrc/python_call.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    # The C++ standard is left to torch (C++17 or C++20 by version).
    # -fopenmp: at::parallel_for is an inline OpenMP loop in torch's headers,
    # serial unless the extension itself is compiled with OpenMP.
    cxx_flags = ["-O3", "-Wno-psabi", "-fopenmp"]
    link_flags = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    if not with_cuda:
        return [
            cpp_extension.CppExtension(
                "rlhf_kernels._C", sources, include_dirs=include_dirs,
                extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags,
            )
        ]
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    return [
        cpp_extension.CUDAExtension(
            "rlhf_kernels._C", sources, include_dirs=include_dirs, extra_link_args=link_flags,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
        )
    ]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(
    name="rlhf_kernels",
    version="0.1.0",
    description="Fused Triton, CUDA and C++ kernels for PPO training of language models",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["rlhf_kernels", "rlhf_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.5"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "hypothesis", "pytest-benchmark"],
        "train": ["transformers>=4.46", "matplotlib", "tqdm"],
    },
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    entry_points={"console_scripts": ["rlhf-kernels=rlhf_kernels.cli:run"]},
)
