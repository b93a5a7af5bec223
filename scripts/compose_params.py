"""Write params.yaml as DVC's Hydra integration composes it from conf/ (default profile).

Run after changing a default in src/magicseg/core/config.py: conf/config.yaml is refreshed from the
typed defaults (keeping its header), then params.yaml is composed exactly as `dvc exp run` would.
Usage: python scripts/compose_params.py [--profile paper|magicseg]
"""

import argparse
from pathlib import Path

import yaml
from dvc.utils.hydra import compose_and_dump

from magicseg.core.config import Params

ROOT = Path(__file__).resolve().parents[1]

parser = argparse.ArgumentParser()
parser.add_argument("--profile", default=None)
parser.add_argument(
    "--refresh-defaults",
    action="store_true",
    help="rewrite conf/config.yaml from the typed defaults first",
)
args = parser.parse_args()
if args.refresh_defaults:
    conf = ROOT / "conf/config.yaml"
    header = conf.read_text().split("\nseed:", 1)[0] + "\n"
    data = Params().model_dump(mode="json")
    data.pop("profile")
    conf.write_text(header + yaml.safe_dump(data, sort_keys=False))
overrides = [f"profile={args.profile}"] if args.profile else []
compose_and_dump(ROOT / "params.yaml", str(ROOT / "conf"), None, "config", str(ROOT), overrides)
print("params.yaml composed from conf/" + (f" with profile={args.profile}" if args.profile else ""))
