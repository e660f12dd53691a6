#!/usr/bin/env python3
"""`helm template` without a helm binary, through the Helm library that the PyPI wheel
helm-python-sdk ships (helm_python, libhelm_c.so: Helm v4 built with cgo). Used by ops/check.sh
only when `helm` is absent.

    helm_render.py SDK_DIR CHART VALUES_FILE OUT.yaml

SDK_DIR is where the wheel was unpacked (it holds helm_python/). VALUES_FILE is deep-merged over
the chart's values.yaml (as `helm template -f VALUES_FILE` does); release creto-enablement,
namespace creto-enablement, as an install. Writes every rendered manifest (NOTES.txt left out)
to OUT.yaml. Exit 1 when a template fails to render.
"""
import sys

import yaml


def main(sdk_dir, chart_dir, values_file, out):
    sys.path.insert(0, sdk_dir)
    from helm_python.chart import Chart  # noqa: E402 (the wheel is not installed)

    with open(values_file, encoding="utf-8") as f:
        values = yaml.safe_load(f) or {}
    try:
        rendered = Chart.load(chart_dir).render(
            values, name="creto-enablement", namespace="creto-enablement", is_install=True)
    except Exception as e:  # the SDK's HelmRenderError / HelmValuesError
        print(f"helm render with {values_file}: {e}", file=sys.stderr)
        return 1
    docs = 0
    with open(out, "w", encoding="utf-8") as f:
        for path in sorted(rendered):
            text = rendered[path]
            if path.endswith("NOTES.txt") or not text.strip():
                continue
            f.write(f"---\n# Source: {path}\n{text}\n")
            docs += 1
    print(f"helm render with {values_file}: {docs} templates rendered")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 5:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(*sys.argv[1:]))
