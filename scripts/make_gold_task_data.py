"""Make data/gold_task/ (the topic-list task of notebook 07) and check a fresh build against it.

    python scripts/make_gold_task_data.py            # rebuild in a temporary folder and compare (changes nothing)
    python scripts/make_gold_task_data.py --exact    # the same, but byte for byte against SHA256SUMS
    python scripts/make_gold_task_data.py --write    # rebuild data/gold_task/ and rewrite SHA256SUMS

Everything is seeded (seed 0). The check first verifies the shipped files against SHA256SUMS (damaged or edited
files), then rebuilds and compares with rpo_lib.tasks.compare_builds: the corpus and the tokenizer must be
equal (pure Python and integer counting); the reference model and the pairs, trained and sampled with torch,
must agree within rpo_lib.tasks.REBUILD_TOLERANCES, because another CPU rounds differently and training
amplifies that. --exact asks for the same bytes, which holds only on the CPU family and torch build that made
the files. About 20 s on 2 CPU cores. See data/README.md for what each file is.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rpo_lib.tasks import DATA_DIR, build_files, compare_builds, sha256sums  # noqa: E402


def read_sums(path: Path) -> dict[str, str]:
    sums = {}
    for line in path.read_text().splitlines():
        if line.strip():
            digest, name = line.split(maxsplit=1)
            sums[name.strip()] = digest
    return sums


def write_sums(path: Path, sums: dict[str, str]) -> None:
    path.write_text("".join(f"{digest}  {name}\n" for name, digest in sorted(sums.items())))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rebuild data/gold_task/ and rewrite SHA256SUMS")
    parser.add_argument("--out", type=Path, default=DATA_DIR, help="target folder (default: data/gold_task)")
    parser.add_argument("--exact", action="store_true",
                        help="compare the rebuild byte for byte with SHA256SUMS (holds only on the CPU that made them)")
    args = parser.parse_args(argv)
    recorded_path = args.out / "SHA256SUMS"
    if args.write:
        if args.out.exists():
            shutil.rmtree(args.out)
        sums = build_files(args.out, progress=True)
        write_sums(recorded_path, sums)
        print(f"wrote {len(sums)} files and SHA256SUMS to {args.out}")
        return 0
    if not recorded_path.exists():
        print(f"{recorded_path} is missing: run with --write to make the files.", file=sys.stderr)
        return 2
    recorded = read_sums(recorded_path)
    shipped = sha256sums(args.out)
    damaged = sorted(name for name in recorded if shipped.get(name) != recorded[name])
    with tempfile.TemporaryDirectory() as scratch:
        rebuilt = build_files(Path(scratch) / "gold_task", progress=True)
        if args.exact:
            differ = sorted(set(recorded) ^ set(rebuilt) | {n for n in recorded if rebuilt.get(n) != recorded[n]})
            problems = [f"a fresh build differs from SHA256SUMS in: {', '.join(differ)} (a CPU or torch build other "
                        f"than the one that made them rounds differently; run without --exact to compare what "
                        f"the files contain, within tolerances)"] if differ else []
        else:
            problems = compare_builds(Path(scratch) / "gold_task", args.out)
    if damaged:
        print(f"shipped files differ from SHA256SUMS (edited or damaged): {', '.join(damaged)}", file=sys.stderr)
    for problem in problems:
        print(f"rebuild: {problem}", file=sys.stderr)
    if damaged or problems:
        return 1
    how = "byte for byte" if args.exact else "within rpo_lib.tasks.REBUILD_TOLERANCES"
    print(f"ok: the {len(recorded)} files of {args.out} match SHA256SUMS and a fresh build reproduces them ({how}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
