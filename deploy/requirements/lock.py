"""Write the images' pinned requirement files from a working environment.

    python deploy/requirements/lock.py            # rewrite site.txt and coordinator.txt
    python deploy/requirements/lock.py --check    # exit 1 if they are out of date

Each file pins, at the versions installed in this (tested) environment, exactly the
distributions one image needs: the closure of its top-level requirements below, with
their markers evaluated for the images' platform (CPython 3.11 on Linux x86-64). Sites
need no MLflow and no Ray; the coordinator needs only the MLflow client
(``mlflow-skinny``); the tracking server image is full MLflow with PostgreSQL's
driver. Build tools (numpy first, setuptools, wheel) are pinned too: the
Dockerfiles install them before building pyradiomics without build isolation.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HERE = Path(__file__).resolve().parent
BUILD = ["numpy", "setuptools", "wheel"]
COMMON = [
    "numpy", "scipy", "pandas", "pyarrow", "SimpleITK", "pyradiomics", "flwr",
    "tomli-w", "tqdm", "PyYAML", "cryptography",
    "xgboost-cpu", "scikit-learn",  # the classifier comparison, fitted at the sites
]  # fmt: skip
IMAGES = {
    "site": COMMON,
    # The ServerApp writes results and figures and logs to an MLflow server.
    "coordinator": [*COMMON, "mlflow-skinny", "matplotlib"],
    # The tracking server: full MLflow, with PostgreSQL's driver.
    "mlflow": ["mlflow"],
}
#: Pins of distributions the development environment does not hold.
EXTRA = {"mlflow": {"psycopg2-binary": "2.9.13"}}
#: The images' platform, for evaluating environment markers.
PLATFORM = {
    "python_version": "3.11",
    "python_full_version": "3.11.7",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}


def _requires(name: str, extras: set[str]) -> list[tuple[str, set[str]]]:
    """The installed distribution's requirements that apply on the images' platform."""
    found = []
    for text in metadata.distribution(name).requires or []:
        req = Requirement(text)
        env = {**default_environment(), **PLATFORM}
        if req.marker is not None and not any(
            req.marker.evaluate({**env, "extra": e}) for e in (extras or {""})
        ):
            continue
        found.append((req.name, set(req.extras)))
    return found


def closure(roots: list[str]) -> dict[str, str]:
    """``{distribution: version}`` of ``roots`` and everything they need."""
    pinned: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(r, set()) for r in roots]
    while todo:
        name, extras = todo.pop()
        key = (canonicalize_name(name), frozenset(extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        pinned[dist.metadata["Name"]] = dist.version
        todo.extend(_requires(name, extras))
    return pinned


def render(image: str) -> str:
    pins = closure(IMAGES[image] + BUILD) | EXTRA.get(image, {})
    lines = [
        f"# {image} image: pinned by deploy/requirements/lock.py from a tested environment.",
        "# Do not edit by hand; regenerate after changing radfed's dependencies.",
    ]
    lines += [f"{n}=={v}" for n, v in sorted(pins.items(), key=lambda kv: kv[0].lower())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="only report stale files")
    args = p.parse_args(argv)
    stale = []
    for image in IMAGES:
        path = HERE / f"{image}.txt"
        text = render(image)
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
        else:
            path.write_text(text)
            print(path)
    if stale:
        print(f"out of date: {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
