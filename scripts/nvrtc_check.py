#!/usr/bin/env python3
"""Compiles every kernels/*.cu (with kernels/common.cuh prepended, as the CUDA
backend does) with NVRTC for sm_80 and sm_90 and fails on any error or warning.

A developer's quick check that needs no cargo build; the authoritative check is
the Rust test `cuda_nvrtc` (tests/cuda_nvrtc.rs), which CI runs.

    NVRTC_LIB=/path/to/libnvrtc.so.13 python3 scripts/nvrtc_check.py [file.cu ...]
"""
import ctypes, glob, os, sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
lib = ctypes.CDLL(os.environ.get("NVRTC_LIB", "libnvrtc.so.13"))
common = open(os.path.join(ROOT, "kernels", "common.cuh")).read()
files = sys.argv[1:] or sorted(glob.glob(os.path.join(ROOT, "kernels", "*.cu")))
failed = False
for path in files:
    src = common + "\n#line 1 \"" + os.path.basename(path) + "\"\n" + open(path).read()
    for arch in ("sm_80", "sm_90"):
        prog = ctypes.c_void_p()
        assert lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), os.path.basename(path).encode(), 0, None, None) == 0
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"--device-as-default-execution-space"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
        n = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetProgramLog(prog, buf)
        log = buf.value.decode(errors="replace").strip()
        ok = rc == 0 and not log
        print(f"{'ok  ' if ok else 'FAIL'} {os.path.basename(path)} {arch}" + ("" if ok else f" (rc {rc})\n{log}"))
        failed |= not ok
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
sys.exit(1 if failed else 0)
