"""The notebook's "check your data": the doctor's top suspects as a grid of thumbnails, each
with a keep / relabel / exclude choice, saved to a fixes file (the data folder is never touched).

Thumbnails are drawn from the photos when the grid is made, in memory; nothing is written but
the fixes file, by helpers.data.fixes.write_fixes, when "Save decisions" is clicked.
"""

from __future__ import annotations

import html
import io
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from helpers.core.errors import FixesError, ImageError
from helpers.data.fixes import Fixes, read_fixes, write_fixes
from helpers.data.folders import SPLITS
from helpers.data.images import open_image
from helpers.data.preprocess import Preprocess
from helpers.data.splits import DataSplits, load_data

if TYPE_CHECKING:  # a notebook dependency, imported where the widget is made
    import ipywidgets

THUMBNAIL = 150  # pixels: the longer side of a thumbnail
KINDS = ("across-splits", "across-classes")  # the duplicate groups worth a decision


def summary(report: dict[str, Any]) -> str:
    """A few lines of what the doctor found: the photos, then how many of each list."""
    counts = report["counts"]
    splits = ", ".join(f"{s} {n}" for s, n in counts["splits"].items())
    lines = [f"{counts['total']} photos in {len(counts['classes'])} classes ({splits}), "
             f"{counts['smallest']} to {counts['largest']} a class"]
    for title, key in (("exact duplicates", "duplicates"), ("near-duplicates", "near_duplicates")):
        kinds = Counter(g["kind"] for g in report[key])
        lines.append(f"{title}: {len(report[key])} group(s)" + (" (" + ", ".join(
            f"{n} {k}" for k, n in sorted(kinds.items())) + ")" if kinds else ""))
    issues = report["label_issues"]
    sure = sum(i.get("confident", False) for i in issues)
    lines.append(f"suspected label errors: {len(issues)}"
                 + (f" ({sure} flagged by confident learning)" if issues else ""))
    lines.append(f"strangers and unusable files: {len(report['strangers'])}")
    return "\n".join(lines)


def _folder_of(path: str, classes: dict[str, Any]) -> str | None:
    """The class folder a relative path lies in (split/class/... or class/...), if known."""
    parts = PurePosixPath(path).parts
    if len(parts) > 2 and parts[0] in SPLITS and parts[1] in classes:
        return parts[1]
    return parts[0] if len(parts) > 1 and parts[0] in classes else None


def _copies(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One suspect per copy in across-splits or across-classes duplicate groups.

    Every photo but the one kept (the first in train/), suggested its class when they differ.
    """
    found = []
    for key, word in (("duplicates", "same photo as"), ("near_duplicates", "near copy of")):
        for group in (g for g in report[key] if g["kind"] in KINDS):
            members = list(zip(group["paths"], group["classes"], group["splits"], strict=True))
            kept = next((m for m in members if m[2] == "train"), members[0])
            for path, folder, _ in (m for m in members if m is not kept):
                found.append({"path": path, "kind": f"{group['kind']} copy", "given": folder,
                              "suggested": kept[1] if kept[1] != folder else None,
                              "why": f"{word} {kept[0]}"})
    return found


def suspects(report: dict[str, Any], *, top: int = 12) -> list[dict[str, Any]]:
    """At most `top` photos to decide on: label issues, copies across splits or classes, strangers.

    Label issues come first, but a third of the places are kept for the others when there are any.
    """
    classes = report["counts"]["classes"]
    issues = [{"path": i["path"], "kind": "label issue" + (" (confident learning)" if i.get(
        "confident") else ""), "given": i["given"], "suggested": i["suggested"],
        "why": f"score {i['score']:.2f}"} for i in report["label_issues"]]
    rest = _copies(report) + [{"path": s["path"], "kind": "stranger",
                               "given": _folder_of(s["path"], classes), "suggested": None,
                               "why": s["why"]} for s in report["strangers"]]

    def name(folder: str | None) -> str | None:
        return classes[folder]["name"] if folder in classes else None

    chosen, seen = [], set()
    for item in issues[:top - min(len(rest), top // 3)] + rest:
        if item["path"] not in seen and len(chosen) < top:
            seen.add(item["path"])
            chosen.append(item | {"given_name": name(item["given"]),
                                  "suggested_name": name(item["suggested"])})
    return chosen


def thumbnail(path: str | os.PathLike, *, size: int = THUMBNAIL) -> bytes | None:
    """A JPEG thumbnail of a photo, in memory (None when it cannot be read)."""
    try:
        image = open_image(path, at_least=size)
    except ImageError:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _choice(previous: Fixes, path: str) -> str:
    """A photo's saved decision: exclude, relabel:FOLDER or keep."""
    if path in previous.exclude:
        return "exclude"
    return f"relabel:{previous.relabel[path]}" if path in previous.relabel else "keep"


def _cell(item: dict[str, Any], *, root: Path, value: str) -> ipywidgets.VBox:
    """A suspect's thumbnail, its given and suggested names, and its keep / relabel / exclude."""
    import ipywidgets as widgets

    data = thumbnail(root / item["path"])
    picture = (widgets.Image(value=data, format="jpeg", width=THUMBNAIL) if data else
               widgets.HTML(f"<i>cannot be drawn: {html.escape(item['why'])}</i>"))
    e = html.escape
    lines = [f"<b>{e(item['kind'])}</b>: {e(item['why'])}",
             f"given: <b>{e(item['given_name'] or '?')}</b> ({e(str(item['given']))})"]
    options = [("keep", "keep")]
    if item["suggested"]:
        lines.append(f"suggested: <b>{e(item['suggested_name'])}</b> ({e(item['suggested'])})")
        options.append(("relabel", f"relabel:{item['suggested']}"))
    if value.startswith("relabel:") and value not in dict(options).values():
        options.append((f"relabel to {value[8:]}", value))  # saved before, to another class
    options.append(("exclude", "exclude"))
    lines.append(f"<small>{e(item['path'])}</small>")
    caption = widgets.HTML("<br>".join(lines), layout=widgets.Layout(width=f"{THUMBNAIL + 40}px"))
    choice = widgets.ToggleButtons(options=options, value=value,
                                   style={"button_width": "62px"},
                                   tooltips=[f"{label} {item['path']}" for label, _ in options])
    return widgets.VBox([picture, caption, choice])


def review(report: dict[str, Any], *, root: str | os.PathLike, fixes_path: str | os.PathLike,
           top: int = 12) -> ipywidgets.VBox:
    """A grid of the top suspects, each kept, relabelled or excluded, saved to `fixes_path`.

    Each cell: a thumbnail, the given and suggested class names and a keep / relabel / exclude
    choice (starting from the saved one); "Save decisions" merges them in with write_fixes.
    """
    import ipywidgets as widgets

    root, fixes_path = Path(root), Path(fixes_path)
    classes = report["counts"]["classes"]
    items = suspects(report, top=top)
    if not items:
        return widgets.VBox([widgets.HTML("Nothing to review: no suspected label errors, no "
                                          "copies across splits or classes, no strangers.")])
    previous = read_fixes(fixes_path) if fixes_path.is_file() else Fixes(source=str(fixes_path))
    cells = [_cell(item, root=root, value=_choice(previous, item["path"])) for item in items]
    grid = widgets.GridBox(cells, layout=widgets.Layout(
        grid_template_columns=f"repeat(auto-fill, minmax({THUMBNAIL + 50}px, 1fr))",
        grid_gap="10px"))
    save = widgets.Button(description="Save decisions", button_style="primary", icon="save")
    output = widgets.Output()
    header = widgets.HTML(f"The {len(items)} most suspect photos of {html.escape(str(root))}: "
                          "keep, relabel (to the suggested class) or exclude each, then save.")

    def on_save(_button: Any) -> None:
        decisions = {item["path"]: cell.children[2].value
                     for item, cell in zip(items, cells, strict=True)}
        with output:
            output.clear_output()
            try:
                fixes = write_fixes(decisions, path=fixes_path, root=root,
                                    classes=report["counts"]["classes"])
            except FixesError as err:
                print(err)
                return
            print(f"saved to {fixes_path}: {len(fixes.exclude)} photo(s) excluded, "
                  f"{len(fixes.relabel)} relabelled (the data folder is untouched)")
            for p in sorted(fixes.exclude):
                print(f"  exclude {p}")
            for p, c in sorted(fixes.relabel.items()):
                print(f"  relabel {p} -> {c} ({classes[c]['name'] if c in classes else '?'})")

    save.on_click(on_save)
    return widgets.VBox([header, grid, save, output])


def apply_saved(found: DataSplits, *, spec: Preprocess, path: str | os.PathLike,
                log: Callable[[str], None] = print) -> DataSplits:
    """The data loaded again with the fixes file at `path` applied, or `found` without one."""
    path = Path(path)
    if not path.is_file():
        log(f"no fixes file at {path} yet: the data as loaded")
        return found
    loaded = load_data(found.root, spec, fixes=read_fixes(path))
    log(next(m for m in loaded.messages if m.startswith("fixes from")))
    return loaded
