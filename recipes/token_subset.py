"""A view of a token dataset's first train shards: a directory whose manifest lists only them and whose shards/ links
to the dataset's, so `falconspec train --data VIEW` reads that slice (same files, same hashes, nothing copied).

usage: python recipes/token_subset.py DATASET N OUT [--split SPLIT]
e.g.   python recipes/token_subset.py recipes/data/sharegpt-sd 22 runs/data/tokens-greedy-22
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def write_view(dataset: str | Path, shards: int, out: str | Path, split: str = "train") -> dict:
    """Write the view of ``dataset``'s ``split`` shards 0..``shards``-1 to ``out``; returns its totals."""
    from falconspec.token_data import read_manifest, write_manifest

    dataset, out = Path(dataset), Path(out)
    manifest = read_manifest(dataset)
    kept = [s for s in manifest["shards"] if s["split"] == split and s["index"] < shards]
    if len(kept) < shards:
        raise SystemExit(f"{dataset} has {len(kept)} {split} shards below index {shards}, not {shards}")
    out.mkdir(parents=True, exist_ok=True)
    link = out / "shards"
    if link.is_symlink():
        link.unlink()
    link.symlink_to(os.path.relpath(dataset.resolve() / "shards", out.resolve()))
    view = {**manifest, "shards": kept, "view_of": {"dataset": str(dataset), "split": split, "shards": shards}}
    write_manifest(out, view)
    return view["totals"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("shards", type=int, help="keep the split's shards 0..N-1")
    parser.add_argument("out")
    parser.add_argument("--split", default="train")
    args = parser.parse_args()
    print(write_view(args.dataset, args.shards, args.out, args.split))


if __name__ == "__main__":
    main()
