"""`doctor`: duplicates, leaks, label errors, strangers and class counts of a data folder."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from helpers.core.errors import FolderError, UserError
from helpers.core.files import atomic_write_bytes
from helpers.core.text import shown

HINTS = {
    "across-splits": "the same photo in training and held out inflates the held-out accuracy: "
                     "exclude the held-out copies",
    "across-classes": "one photo under two labels: relabel the wrong copies or exclude them",
    "within-class": "copies weigh a photo twice: exclude all but one",
}
FIXES_HINT = ('put the paths in a fixes file, {"exclude": [...], "relabel": {"path": '
              '"class_folder"}}, and train with --fixes FILE (the data folder is never touched)')


def _groups(title: str, groups: list[dict[str, Any]], *, top: int) -> list[str]:
    """Lines for exact or near-duplicate groups: the count by kind, the first, the hints."""
    if not groups:
        return [f"{title}: none"]
    kinds = Counter(g["kind"] for g in groups)
    order = sorted(groups, key=lambda g: list(HINTS).index(g["kind"]))
    lines = [f"{title}: {len(groups)} group(s), "
             + ", ".join(f"{kinds[k]} {k}" for k in HINTS if kinds[k])]
    lines += [f"  {g['kind']:14} " + " = ".join(g["paths"][:4])
              + (f" (+{len(g['paths']) - 4})" if len(g["paths"]) > 4 else "")
              for g in order[:top]]
    lines += [f"  hint ({k}): {HINTS[k]}" for k in HINTS if kinds[k]]
    return lines


def render(report: dict[str, Any], *, top: int = 5) -> str:
    """The doctor's findings as text: counts, then the top of each list with what to do."""
    counts = report["counts"]
    splits = ", ".join(f"{s} {n}" for s, n in counts["splits"].items())
    rows = counts["classes"]
    small = min(rows, key=lambda c: rows[c]["total"])
    big = max(rows, key=lambda c: rows[c]["total"])
    lines = [f"{report['data']}: {counts['total']} photos in {len(rows)} classes ({splits})",
             f"photos a class: {counts['smallest']} ({rows[small]['name']}) to {counts['largest']}"
             f" ({rows[big]['name']}), imbalance {counts['imbalance']}x"
             + ("; add photos to the small classes" if counts["imbalance"] > 10 else "")]
    lines += _groups("exact duplicates", report["duplicates"], top=top)
    lines += _groups("near-duplicates", report["near_duplicates"], top=top)
    issues = report["label_issues"]
    sure = sum(i.get("confident", False) for i in issues)
    lines.append(f"suspected label errors: {len(issues) or 'none'}"
                 + (f" ({sure} flagged by confident learning; most suspicious first)"
                    if issues else ""))
    lines += [f"  {i['score']:.2f} {i['path']}: labelled {i['given_name']} ({i['given']}), "
              f"looks like {i['suggested_name']} ({i['suggested']})" for i in issues[:top]]
    if issues:
        lines.append("  hint: look at each photo; relabel it to the suggested class folder, or "
                     "exclude it if it is neither")
    strangers = report["strangers"]
    lines.append(f"strangers and unusable files: {len(strangers) or 'none'}")
    lines += [f"  {'-' if s['score'] is None else format(s['score'], '.1f'):>5} {s['path']}: "
              f"{s['why']}" for s in strangers[:top]]
    if strangers:
        lines.append("  hint: exclude photos of no class (blank, not a flower, a screenshot) and "
                     "unreadable or tiny files")
    if issues or strangers or report["duplicates"] or report["near_duplicates"]:
        lines.append(f"to fix: {FIXES_HINT}")
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> None:
    """Check a data folder for duplicates, leaks, label errors, strangers and imbalance."""
    from helpers.core.files import check_writable
    from helpers.data.fixes import read_fixes
    from helpers.insight import doctor

    data = Path(args.data).expanduser()
    if not data.is_dir():
        raise UserError(f"{data}: no such folder; give a folder of class folders of photos")
    fixes = read_fixes(args.fixes) if args.fixes else None
    out = Path(args.json) if args.json else None
    if out is not None:
        if out.is_dir():
            raise UserError(f"--json {out}: a folder; give a file name, like doctor.json")
        try:
            check_writable(out.parent)
        except FolderError as err:
            raise UserError(f"{err} (--json)") from None
    report = doctor.examine(data, names_file=args.names, fixes=fixes,
                            valid_fraction=args.valid_fraction,
                            test_fraction=args.test_fraction)
    print("\n".join(shown(line) for line in render(report, top=args.top).splitlines()))
    if out is not None:
        atomic_write_bytes((json.dumps(report, indent=1) + "\n").encode(), out)
        print(f"wrote {out}")


def add_commands(sub: argparse._SubParsersAction) -> None:
    """The `doctor` command."""
    p = sub.add_parser("doctor", help="check a data folder: duplicates, leaks, label errors, "
                                      "strangers, counts", description=cmd_doctor.__doc__)
    p.add_argument("data", help="a data folder in any layout train reads")
    p.add_argument("--json", metavar="FILE", help="also write every finding to FILE as JSON")
    p.add_argument("--fixes", metavar="FILE",
                   help="a fixes file to apply first (check a folder as it will be trained on)")
    p.add_argument("--names", "--category_names", dest="names",
                   help="JSON file of class folder -> name (default as train)")
    p.add_argument("--valid_fraction", type=float, default=0.2,
                   help="as train: held out for validation when there is no valid/ folder")
    p.add_argument("--test_fraction", type=float, default=0.2,
                   help="as train: held out for testing when there is no test/ folder")
    p.add_argument("--top", type=int, default=5, help="lines shown of each list (default 5)")
    p.set_defaults(func=cmd_doctor)
