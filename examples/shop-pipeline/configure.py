"""Prints the shop pipeline's table for atelier.toml: each of its four stages a Python stage
command, named by absolute path (a stage runs in its job's own dir), and the settings the
stages read passed through from the server's environment.

    python3 examples/shop-pipeline/configure.py > atelier.toml
    .venv/bin/python examples/shop-pipeline/configure.py --name shop > atelier.toml

The stages run with the Python that runs this script (or `--python`); when that one cannot
import `atelier_stage`, they get the SDK from this repository through PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

HERE = Path(__file__).resolve().parent
SDK_SRC = HERE.parent.parent / "sdk" / "python" / "src"
STAGES = {
    "generating_ideas": "ideas.py",
    "creating_images": "image.py",
    "uploading": "upload.py",
    "creating_products": "product.py",
}
SERVICES = ["IDEAS", "IMAGE", "UPLOAD", "PRODUCT"]
#: What the stages read from the environment: passed from the server's, when set there.
PASS_ENV = [f"SHOP_{s}_{k}" for s in SERVICES for k in ("URL", "KEY")] + ["SHOP_HTTP_TIMEOUT_S", "SHOP_STAGE_TIMEOUT_S"]
#: The whole job's wall clock: four stages, each within its own timeout (120 s by default).
TIMEOUT_SECONDS = 600


def has_sdk(python: str) -> bool:
    probe = subprocess.run([python, "-c", "import atelier_stage"], capture_output=True, timeout=30)
    return probe.returncode == 0


def toml_string(s: str) -> str:
    # A JSON string is a valid TOML basic string for the text used here.
    return json.dumps(s)


def pipeline_table(name: str, python: str, sdk_path: Optional[Path], extra: Optional[List[str]] = None) -> str:
    """The `[pipelines.NAME]` table; `extra` lines (other settings) go at its end."""
    lines = [
        f"[pipelines.{name}]",
        f"timeout_seconds = {TIMEOUT_SECONDS}",
        "pass_env = [" + ", ".join(toml_string(v) for v in PASS_ENV) + "]",
    ]
    if sdk_path is not None:
        lines.append(f"env = {{ PYTHONPATH = {toml_string(str(sdk_path))} }}")
    for stage, script in STAGES.items():
        command = ", ".join(toml_string(a) for a in (python, str(HERE / "stages" / script)))
        lines.append(f"stages.{stage} = {{ command = [{command}] }}")
    lines.extend(extra or [])
    return "\n".join(lines) + "\n"


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", default="shop", help="the pipeline's name (default: shop)")
    parser.add_argument("--python", default=sys.executable, help="the Python the stages run with")
    args = parser.parse_args(argv)
    if not re.fullmatch(r"[a-z0-9_-]+", args.name):
        parser.error(f"--name {args.name!r}: a pipeline's name uses only a-z, 0-9, '_' and '-'")
    python = str(Path(args.python).absolute())
    sdk_path = None if has_sdk(python) else SDK_SRC
    sys.stdout.write(pipeline_table(args.name, python, sdk_path))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
