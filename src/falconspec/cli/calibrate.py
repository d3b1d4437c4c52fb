"""``falconspec calibrate``: measure what verification and drafting cost on this machine, and cache it.

Times one target forward over n tree nodes for every product path (stock ``F.linear`` and, in float32 on CPU, the
few-row and oneDNN paths), keeps the fastest per n, and runs each drafter briefly to measure its cost per drafting
depth and its acceptance per (depth, rank). The planner sizes every tree from these figures. The result is cached per
machine fingerprint (``$FALCONSPEC_CALIBRATION_DIR``, default ``<cache>/calibration``) and reused by
``generate``, ``serve`` and ``bench``; the first of those to meet an uncalibrated machine runs the quick form.
"""

from __future__ import annotations

import argparse
import json
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("calibrate", help="measure verification and drafting costs on this machine",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias, model directory or hub id")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--drafters", nargs="+", default=None,
                        help="drafters to calibrate (default: the ones shipped for the model, and pld and lookahead)")
    parser.add_argument("--quick", action="store_true", help="the quick form (seconds) instead of the full one")
    parser.add_argument("--recalibrate", action="store_true",
                        help="measure again even if this machine's calibration is cached (also "
                             "FALCONSPEC_RECALIBRATE=1)")
    parser.add_argument("--json", action="store_true", help="print the calibration file's contents")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..calibrate import FULL, QUICK, Calibration
    from ..drafters import SHIPPED_KINDS, make_drafter, shipped_drafter_dir
    from ..drafters.registry import MODEL_FREE_NAMES
    from ..models import load_target

    effort = QUICK if args.quick else FULL
    target = load_target(args.model, dtype=args.dtype, device=args.device)
    names = args.drafters or ([k for k in SHIPPED_KINDS if shipped_drafter_dir(target.name, k).is_dir()]
                              + [name for name in MODEL_FREE_NAMES if name != "none"])
    start = time.perf_counter()
    calibration = Calibration.for_target(target, effort, recalibrate=args.recalibrate)
    if args.recalibrate:
        calibration.data["drafters"] = {}
    calibration.apply_paths(target)
    for name in names:
        drafter = make_drafter(name, target)
        entry = calibration.drafter_entry(target, drafter, effort)
        ms = ", ".join(f"d{d} {s * 1e3:.1f}" for d, s in zip(entry["depths"], entry["draft_seconds"]))
        hits, trials = entry["hits"][0][0], entry["trials"][0][0]
        accepted = f"{hits / trials:.0%} of {trials:.0f}" if trials else "never proposed on the calibration prompts"
        print(f"{name}: draft ms per cycle by depth: {ms}; depth-1 top candidate accepted {accepted}")
    print(calibration.describe())
    print(f"calibrated in {time.perf_counter() - start:.1f} s")
    if args.json:
        print(json.dumps(calibration.data, indent=1))
    return 0
