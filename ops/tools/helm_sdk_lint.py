#!/usr/bin/env python3
"""`helm lint` without a helm binary, through the Helm library that the PyPI wheel helm-sdkpy
ships (libhelm_sdkpy.so, Helm v4 built with cgo). Used by ops/check.sh only when `helm` is absent.

    helm_sdk_lint.py LIBHELM_SO CHART [VALUES_FILE...]

The library's lint takes no values files, so for each VALUES_FILE the chart is copied to a
temporary directory with VALUES_FILE deep-merged into values.yaml (as `helm -f` would), then
linted; with no VALUES_FILE the chart is linted as is. Lint renders every template, so template
syntax errors and templates that do not produce valid YAML fail. Exit 1 on any lint error.
"""
import ctypes
import json
import os
import shutil
import sys
import tempfile

import yaml

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}


def merge(base, over):
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def lint(lib, handle, chart):
    out = ctypes.c_void_p()
    rc = lib.helm_sdkpy_lint(handle, chart.encode(), ctypes.byref(out))
    if rc != 0 or not out.value:
        err = lib.helm_sdkpy_last_error()
        raise RuntimeError(ctypes.string_at(err).decode() if err else f"lint returned {rc}")
    result = json.loads(ctypes.string_at(out.value).decode())
    lib.helm_sdkpy_free(out)
    return result


def main(so, chart, values_files):
    lib = ctypes.CDLL(so)
    lib.helm_sdkpy_config_create.argtypes = [ctypes.c_char_p] * 4 + [
        ctypes.POINTER(ctypes.c_ulonglong)]
    lib.helm_sdkpy_lint.argtypes = [ctypes.c_ulonglong, ctypes.c_char_p,
                                    ctypes.POINTER(ctypes.c_void_p)]
    lib.helm_sdkpy_last_error.restype = ctypes.c_void_p
    lib.helm_sdkpy_free.argtypes = [ctypes.c_void_p]
    handle = ctypes.c_ulonglong()
    # No cluster is contacted by lint; the kubeconfig path only has to be a string.
    if lib.helm_sdkpy_config_create(b"default", b"/dev/null", b"", b"{}", ctypes.byref(handle)):
        print("helm-sdk: cannot create a Helm configuration", file=sys.stderr)
        return 1
    failed = 0
    for values in values_files or [None]:
        with tempfile.TemporaryDirectory() as tmp:
            target = os.path.join(tmp, os.path.basename(os.path.abspath(chart)))
            shutil.copytree(chart, target)
            if values:
                with open(os.path.join(target, "values.yaml"), encoding="utf-8") as f:
                    base = yaml.safe_load(f)
                with open(values, encoding="utf-8") as f:
                    merge(base, yaml.safe_load(f) or {})
                with open(os.path.join(target, "values.yaml"), "w", encoding="utf-8") as f:
                    yaml.safe_dump(base, f)
            result = lint(lib, handle.value, target)
        name = os.path.basename(values) if values else "values.yaml"
        errors = [m for m in result.get("Messages") or [] if m.get("Severity", 0) >= 3]
        for m in result.get("Messages") or []:
            print(f"  {name}: [{SEVERITY.get(m.get('Severity'), '?')}] {m.get('Path')}")
        if errors or result.get("Errors"):
            failed += 1
            print(f"helm-sdk lint with {name}: FAILED", file=sys.stderr)
        else:
            print(f"helm-sdk lint with {name}: ok")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
