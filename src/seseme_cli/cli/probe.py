"""Facts about this install that `seseme --version` and `seseme doctor` report, found without importing torch
where that can be done (torch's import alone takes seconds; --version must answer at once).

- The kernels module (`seseme_cli._kernels`) is plain C++ with a static CUDA runtime: it imports without torch
  and says whether it was built with CUDA and how many GPUs its runtime sees.
- torch's version and CUDA come from its package metadata and its generated `torch/version.py`, read as text.
- GPUs come from the CUDA driver (libcuda) through ctypes: what torch would see, without torch.
"""

from __future__ import annotations

import ast
import ctypes
import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Kernels:
    built: bool  # the module imports
    cuda: bool  # built with CUDA
    runtime_gpus: int  # GPUs the module's own CUDA runtime sees (0 when the driver is older than that runtime)
    version: str | None
    error: str | None  # why it does not import


def kernels() -> Kernels:
    # The same guarded import as seseme_cli.ops.kernels, which also imports torch: here only the facts are needed.
    try:
        from seseme_cli import _kernels as module
    except ImportError as e:
        return Kernels(False, False, 0, None, str(e))
    cuda = bool(module.has_cuda)
    return Kernels(True, cuda, int(module.device_count()) if cuda else 0, getattr(module, "version", None), None)


@dataclass
class Torch:
    version: str | None  # None: not installed
    cuda: str | None  # the CUDA torch was built with; None for a CPU build


def torch_build() -> Torch:
    try:
        version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return Torch(None, None)
    spec = importlib.util.find_spec("torch")
    fields = {}
    if spec is not None and spec.submodule_search_locations:
        try:  # generated at build time: `__version__ = '2.9.1+cu128'`, `cuda: Optional[str] = '12.8'`
            tree = ast.parse((Path(spec.submodule_search_locations[0]) / "version.py").read_text())
        except (OSError, SyntaxError, ValueError):
            tree = None
        for node in getattr(tree, "body", []):
            target = node.targets[0] if isinstance(node, ast.Assign) else getattr(node, "target", None)
            if isinstance(target, ast.Name) and isinstance(getattr(node, "value", None), ast.Constant):
                fields[target.id] = node.value.value
    return Torch(fields.get("__version__") or version, fields.get("cuda"))


@dataclass
class Gpu:
    index: int
    name: str
    capability: tuple[int, int]
    sms: int
    memory_gb: float

    @property
    def arch(self) -> str:
        """What CMAKE_CUDA_ARCHITECTURES takes for this GPU, e.g. 90 for an H100/H200."""
        return f"{self.capability[0]}{self.capability[1]}"

    def describe(self) -> str:
        return (f"{self.name} (compute {self.capability[0]}.{self.capability[1]}, {self.sms} SMs, "
                f"{self.memory_gb:.0f} GB)")


# cuda.h: CUdevice_attribute values
_MULTIPROCESSOR_COUNT, _CC_MAJOR, _CC_MINOR = 16, 75, 76


def driver_gpus() -> tuple[list[Gpu], str | None]:
    """The GPUs the CUDA driver shows this process (CUDA_VISIBLE_DEVICES applies), and why none when none."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return [], "no NVIDIA driver (libcuda) found"
    count = ctypes.c_int(0)
    code = lib.cuInit(0)
    if code != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return [], f"the NVIDIA driver reports no usable GPU (cuInit error {code})"
    gpus = []
    for i in range(count.value):
        device, value, memory = ctypes.c_int(), ctypes.c_int(), ctypes.c_size_t()
        raw = ctypes.create_string_buffer(256)
        if lib.cuDeviceGet(ctypes.byref(device), i) != 0 or lib.cuDeviceGetName(raw, 256, device) != 0:
            continue
        attrs = []
        for attribute in (_CC_MAJOR, _CC_MINOR, _MULTIPROCESSOR_COUNT):
            lib.cuDeviceGetAttribute(ctypes.byref(value), attribute, device)
            attrs.append(value.value)
        lib.cuDeviceTotalMem_v2(ctypes.byref(memory), device)
        gpus.append(Gpu(i, raw.value.decode(errors="replace"), (attrs[0], attrs[1]), attrs[2], memory.value / 1e9))
    return gpus, None if gpus else "the NVIDIA driver shows no GPU"


def model_cache() -> Path:
    """Where Hugging Face models (sesame/csm-1b, Mimi, the tokenizer) are downloaded: HF_HUB_CACHE / HF_HOME."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached_models(cache: Path) -> list[str]:
    """The models of that cache seseme reads (others are not listed)."""
    wanted = ("sesame/csm-1b", "kyutai/moshiko-pytorch-bf16", "meta-llama/Llama-3.2-1B")
    return [repo for repo in wanted if (cache / f"models--{repo.replace('/', '--')}").is_dir()]


def source_root() -> Path | None:
    """The source checkout of an editable install (where `pip install -e .` is run), else None."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "CMakeLists.txt").is_file() else None


def rebuild_command(arch: str | None, nvcc_path: str | None) -> str:
    """The one command that builds the CUDA kernels. It names nvcc itself: an install without nvcc leaves
    CMAKE_CUDA_COMPILER=NOTFOUND in the CMake cache of the persistent build folder (build/), and CMake's
    check_language(CUDA) never looks again while that is cached, so the plain install command would stay CPU-only
    (seen on an H200). SESEME_CUDA=ON undoes an earlier `-C cmake.define.SESEME_CUDA=OFF` cached the same way."""
    flags = f" -C cmake.define.CMAKE_CUDA_ARCHITECTURES={arch}" if arch else ""
    flags += f" -C cmake.define.CMAKE_CUDA_COMPILER={nvcc_path or '$(command -v nvcc)'} -C cmake.define.SESEME_CUDA=ON"
    root = source_root()
    where = f"cd {root} && " if root is not None and Path.cwd().resolve() != root else ""
    return f"{where}python3 -m pip install -e .{flags}"


def nvcc() -> tuple[str | None, str | None]:
    """(nvcc on PATH, an nvcc found in $CUDA_HOME or /usr/local/cuda but not on PATH): the build looks on PATH."""
    import shutil

    found = shutil.which("nvcc")
    if found:
        return found, None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return None, str(Path(home) / "bin" / "nvcc")
    return None, None
