"""Write the conformance matrix as markdown from the last run (results.json).

    .venv/bin/python tests/conformance/report.py          # print the table
    .venv/bin/python tests/conformance/report.py --write  # replace the table in docs/conformance.md

Two tables (LoRA and the sequence methods; the other weight methods). Each cell is adaptc's outcome
(pass, n/a = the clear error for a method that does not apply, the stage that failed and why, or
"not run" when results.json has no such cell) next to what PEFT did on a fresh copy of the same model
(yes, or its error). Failure reasons are listed under the tables, numbered.
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
NAMES = {"lora": "LoRA", "prompt": "prompt tuning", "ptuning": "P-tuning", "prefix": "prefix tuning", "ia3": "IA3",
         "ln_tuning": "LN tuning", "bottleneck": "bottleneck", "adalora": "AdaLoRA", "oft": "OFT", "loha": "LoHa",
         "lokr": "LoKr", "vera": "VeRA"}
# Twelve columns do not fit one readable table: LoRA and the sequence methods in the first (with the model's library
# and kind), the other weight methods in the second.
TABLES = (("lora", "prompt", "ptuning", "prefix"), ("ia3", "ln_tuning", "bottleneck", "adalora", "oft", "loha", "lokr", "vera"))
OUTCOMES = ("pass", "n/a", "fail", "not run")


def _peft(text: str) -> str:
    return "yes" if text == "yes" else ("no" if text.startswith("no") else "?")


def table(results: dict) -> str:
    missing = [m for m in METHODS if m not in NAMES or not any(m in t for t in TABLES)]
    if missing:
        raise SystemExit(f"report.py has no column for {missing}: add them to NAMES and TABLES")
    notes: list[str] = []
    peft_notes: list[str] = []

    def note(bucket: list[str], text: str) -> int:
        if text not in bucket:
            bucket.append(text)
        return bucket.index(text) + 1

    def cell(arch_id: str, method: str) -> str:
        r = results.get(f"{arch_id}/{method}")
        if r is None:
            counts[method]["not run"] += 1
            return "not run"
        counts[method][r["outcome"]] += 1
        if r["outcome"] == "pass":
            ours = "pass"
        elif r["outcome"] == "n/a":
            ours = "n/a (clear error)"
        else:
            ours = f"**fail** at {r['stage']} [{note(notes, r['stage'] + ': ' + r['message'])}]"
        peft = r.get("peft", "")
        peft_ran[method] += peft == "yes"
        theirs = _peft(peft) if peft == "yes" or not peft else f"no [p{note(peft_notes, peft[4:-1])}]"
        return f"{ours} / PEFT {theirs}"

    counts = {m: dict.fromkeys(OUTCOMES, 0) for m in METHODS}
    peft_ran = dict.fromkeys(METHODS, 0)
    tables: list[list[str]] = []
    for i, group in enumerate(TABLES):
        methods = [m for m in group if m in METHODS]
        first = i == 0  # the first table names each model's library and kind; the others only the model
        head = "| architecture | " + ("library | kind | " if first else "") + " | ".join(NAMES[m] for m in methods)
        lines = [head + " |", "|" + "---|" * ((3 if first else 1) + len(methods))]
        for arch in ARCHS.values():
            row = f"| {arch.id} | " + (f"{arch.family} | {arch.kind} | " if first else "")
            lines.append(row + " | ".join(cell(arch.id, m) for m in methods) + " |")
        tables.append(lines)

    def tally(methods: tuple[str, ...]) -> str:
        n = {o: sum(counts[m][o] for m in methods if m in METHODS) for o in OUTCOMES}
        return (f"{sum(n.values())} cells: {n['pass']} pass, {n['n/a']} n/a, {n['fail']} fail, {n['not run']} not run; "
                f"PEFT ran {sum(peft_ran[m] for m in methods if m in METHODS)}")

    total = {o: sum(c[o] for c in counts.values()) for o in OUTCOMES}
    summary = (f"{len(ARCHS)} architectures x {len(METHODS)} methods = {sum(total.values())} cells: {total['pass']} pass, "
               f"{total['n/a']} refused with the clear error where the method does not apply (n/a), "
               f"{total['fail']} fail, {total['not run']} not run. PEFT (0.21.2, same models, same options) "
               f"ran {sum(peft_ran.values())} of them.")
    out = [summary, "", "Each cell: adaptc / PEFT."]
    for group, lines in zip(TABLES, tables):
        out += ["", f"{', '.join(NAMES[m] for m in group if m in METHODS)}: {tally(group)}.", "", *lines]
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
