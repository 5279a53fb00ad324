"""Write the conformance matrix as markdown from the last run (results.json).

    .venv/bin/python tests/conformance/report.py          # print the table
    .venv/bin/python tests/conformance/report.py --write  # replace the table in docs/conformance.md

Each cell is adaptc's outcome (pass, n/a = the clear error for a method that does not apply, or
the stage that failed and why) next to what PEFT did on a fresh copy of the same model (yes, or
its error). Failure reasons are listed under the table, numbered.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from zoo import ARCHS, METHODS  # noqa: E402

RESULTS = Path(__file__).with_name("results.json")
DOC = Path(__file__).resolve().parents[2] / "docs" / "conformance.md"  # where `make conformance` writes the table
BEGIN, END = "<!-- conformance:begin -->", "<!-- conformance:end -->"
NAMES = {"lora": "LoRA", "prompt": "prompt tuning", "ptuning": "P-tuning", "prefix": "prefix tuning"}


def _peft(text: str) -> str:
    return "yes" if text == "yes" else ("no" if text.startswith("no") else "?")


def table(results: dict) -> str:
    notes: list[str] = []
    peft_notes: list[str] = []

    def note(bucket: list[str], text: str) -> int:
        if text not in bucket:
            bucket.append(text)
        return bucket.index(text) + 1

    counts = {"pass": 0, "n/a": 0, "fail": 0, "not run": 0}
    peft_yes = 0
    head = "| architecture | library | kind | " + " | ".join(NAMES[m] for m in METHODS) + " |"
    lines = [head, "|" + "---|" * (3 + len(METHODS))]
    for arch in ARCHS.values():
        cells = []
        for method in METHODS:
            r = results.get(f"{arch.id}/{method}")
            if r is None:
                counts["not run"] += 1
                cells.append("not run")
                continue
            counts[r["outcome"]] += 1
            if r["outcome"] == "pass":
                ours = "pass"
            elif r["outcome"] == "n/a":
                ours = "n/a (clear error)"
            else:
                ours = f"**fail** at {r['stage']} [{note(notes, r['stage'] + ': ' + r['message'])}]"
            peft = r.get("peft", "")
            peft_yes += peft == "yes"
            theirs = _peft(peft) if peft == "yes" or not peft else f"no [p{note(peft_notes, peft[4:-1])}]"
            cells.append(f"{ours} / PEFT {theirs}")
        lines.append(f"| {arch.id} | {arch.family} | {arch.kind} | " + " | ".join(cells) + " |")
    total = sum(counts.values())
    summary = (f"{len(ARCHS)} architectures x {len(METHODS)} methods = {total} cells: {counts['pass']} pass, "
               f"{counts['n/a']} refused with the clear error where the method does not apply (n/a), "
               f"{counts['fail']} fail, {counts['not run']} not run. PEFT (0.21.2, same models, same options) "
               f"ran {peft_yes} of them.")
    out = [summary, "", "Each cell: adaptc / PEFT.", "", *lines]
    if notes:
        out += ["", "Why adaptc's cells fail:", ""] + [f"{i}. {t}" for i, t in enumerate(notes, 1)]
    if peft_notes:
        out += ["", "What PEFT said:", ""] + [f"- p{i}: {t}" for i, t in enumerate(peft_notes, 1)]
    return "\n".join(out) + "\n"


def replace_in(doc: Path, text: str) -> None:
    content = doc.read_text()
    if BEGIN not in content or END not in content:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers; add them where the table goes")
    before, rest = content.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    tmp = doc.with_suffix(".tmp")
    tmp.write_text(f"{before}{BEGIN}\n{text}{END}{after}")
    tmp.replace(doc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--write", type=Path, nargs="?", const=DOC, metavar="FILE",
        help=f"replace the table between the conformance markers in FILE (default: {DOC.relative_to(DOC.parents[1])})",
    )
    args = parser.parse_args()
    if not RESULTS.exists():
        raise SystemExit(f"no {RESULTS}: run `make conformance` first")
    text = table(json.loads(RESULTS.read_text()))
    if args.write:
        replace_in(args.write, text)
    print(text, end="")


if __name__ == "__main__":
    main()
