"""Set up the one-machine demo federation: ``python -m radfed.deploy.demo setup --out DIR``.

Writes everything ``compose.demo.yaml`` needs into one folder (the ``demo`` volume):

* ``ca.crt``, ``superlink.{crt,key}`` (names ``coordinator`` and ``gateway``),
  ``mlflow.{crt,key}``, ``nodes/SITE.{key,pub}``, ``study-signing.key`` and
  ``trusted-entities.yaml`` (:func:`radfed.deploy.pki.make_demo`);
* ``study/study.toml`` (the ``radfed demo`` study, tracked to ``https://mlflow:5000``),
  ``study/nodes/SITE.pub`` (the admitted hospitals) and ``study/apps/`` (the signed app);
* ``sites/SITE/`` the synthetic hospitals (images, masks, ``manifest.csv``): each
  hospital extracts its own features in its container;
* ``secrets/mlflow_db_password.txt``.

A second call does nothing. Demo only: the keys that other containers' users must
read are made readable to all, and everything is given to ``--chown UID:GID``.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from radfed.deploy.pki import make_demo, make_server_cert
from radfed.deploy.signing import build_fab, load_signing_key, sign, write_signed_app

READY = ".ready"
KEY_ID = "radfed-demo-study"
TRACKING_URI = "https://mlflow:5000"


def setup(out: Path, sites: int = 3, patients: int = 80, params: str = "default") -> Path:
    """Write the demo folder (see the module docstring); return the study file."""
    from radfed.deploy.local_federation import app_dir
    from radfed.experiments.demo import write_study
    from radfed.experiments.synth import write_cohort

    out = Path(out)
    study_dir = out / "study"
    if (out / READY).exists():
        return study_dir / "study.toml"
    site_dirs = write_cohort(out / "sites", sites=sites, patients=patients, seed=0, progress=False)
    names = [d.name for d in site_dirs]
    make_demo(out, names, hosts=["coordinator", "gateway"], key_id=KEY_ID)
    make_server_cert(out, out, "mlflow", ["mlflow"])
    for name in names:
        (study_dir / "nodes").mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "nodes" / f"{name}.pub", study_dir / "nodes" / f"{name}.pub")
    fab, publisher, app, version = build_fab(app_dir())
    record = sign(fab, load_signing_key(out / "study-signing.key"), KEY_ID)
    write_signed_app(study_dir / "apps", fab, publisher, app, version, record)

    written = write_study(out, site_dirs, params, 0, patients)
    text = re.sub(r"(?m)^uri = .*$", f'uri = "{TRACKING_URI}"', written.read_text())
    study = study_dir / "study.toml"
    study.write_text(text.replace("written by `radfed demo`", "written by radfed.deploy.demo"))
    written.unlink()
    (out / "secrets").mkdir(exist_ok=True)
    (out / "secrets" / "mlflow_db_password.txt").write_text(secrets.token_hex(24) + "\n")
    (out / READY).write_text("")
    return study


def share(out: Path, owner: tuple[int, int] | None) -> None:
    """Demo permissions: keys other containers read become readable, all owned by ``owner``."""
    for name in ("superlink.key", "mlflow.key"):
        os.chmod(Path(out) / name, 0o644)
    os.chmod(Path(out) / "secrets" / "mlflow_db_password.txt", 0o644)
    if owner is None:
        return
    for root, dirs, files in os.walk(out):
        for entry in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(entry, *owner)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m radfed.deploy.demo", description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("setup", help="write the demo folder")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--sites", type=int, default=3)
    s.add_argument("--patients", type=int, default=80)
    s.add_argument("--params", default="default", help="pyradiomics settings: default or fast")
    s.add_argument("--chown", default=None, help="UID:GID to own the folder (demo containers)")
    args = p.parse_args(argv)
    owner = tuple(int(x) for x in args.chown.split(":")) if args.chown else None
    study = setup(args.out, args.sites, args.patients, args.params)
    share(args.out, owner)  # type: ignore[arg-type]
    print(study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
