"""One results table from several pipeline workdirs (a long method comparison run one method per invocation).

python experiments/merge_results.py W_baseline W_cass W_dino_vit ... --out OUT
Reads each W/results.json, checks that runs present in several agree, and writes OUT/results.json and
OUT/results.md (cass_jax.finetune.merge_results).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cass_jax.finetune import merge_results  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", help="pipeline workdirs (or their results.json files)")
    parser.add_argument("--out", required=True, help="folder for the merged results.json and results.md")
    args = parser.parse_args()
    files = [Path(w) / "results.json" if Path(w).is_dir() else Path(w) for w in args.workdirs]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        sys.exit(f"No results.json at {', '.join(missing)}: finish those pipeline runs first.")
    merge_results(files, args.out)


if __name__ == "__main__":
    main()
