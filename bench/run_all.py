"""`make bench`: every benchmark at the sizes bench/RESULTS.md records, then RESULTS.md from their tables.

    .venv/bin/python bench/run_all.py            # about 40-50 minutes on 2 idle cores (estimated)
    .venv/bin/python bench/run_all.py --quick    # tiny sizes: checks the scripts run (numbers meaningless)

Each benchmark also writes its own RESULTS-<name>.md next to this file.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = ["--layers", "4", "--hidden", "256", "--heads", "4", "--seq", "128", "--batch", "8"]
QUICK = ["--layers", "2", "--hidden", "64", "--heads", "4", "--seq", "16", "--batch", "2", "--rounds", "2"]
RUNS = [
    ("lora-train", "bench_lora_train.py", ["--image", "112"]),
    ("inference", "bench_inference.py", []),
    ("prompt", "bench_prompt.py", []),
    ("torch-compile", "bench_torch_compile.py", ["--models", "llama,bert"]),
    ("compile", "bench_compile.py", None),  # its own sizes (depths)
    ("qlora", "bench_qlora.py", None),
    ("methods", "bench_methods.py", []),
    ("ort-generate", "bench_ort_generate.py", None),  # its own sizes (prompt 128, 128 new tokens)
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", help="comma-separated names: " + ", ".join(name for name, _, _ in RUNS)
                        + " (the others' last RESULTS-<name>.md files are kept in RESULTS.md)")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else {name for name, _, _ in RUNS}
    sections = []
    for name, script, extra in RUNS:
        out = HERE / (f"RESULTS-{name}.md" if not args.quick else f"quick-{name}.md")
        if name not in wanted:
            if out.is_file() and not args.quick:
                sections.append(out.read_text())
            continue
        command = [sys.executable, str(HERE / script), "--out", str(out)]
        if extra is not None:
            command += (QUICK if args.quick else SIZES) + extra
        elif args.quick and name == "compile":
            command += ["--depths", "2,4", "--no-bert-base"]
        elif args.quick and name == "qlora":
            command += ["--steps", "1"]
        elif args.quick and name == "ort-generate":
            command += ["--quick"]
        print(f"== {name}: {' '.join(command[1:])}", file=sys.stderr, flush=True)
        subprocess.run(command, check=True)
        sections.append(out.read_text())
    if args.quick:
        return
    import torch
    from bench_lora_train import cpu_name

    header = (f"# adaptc benchmarks\n\nWritten by `make bench` (`python bench/run_all.py`) on {platform.machine()}, "
              f"{cpu_name()}, torch {torch.__version__}, Python {platform.python_version()}. "
              "Each section is one script's output, with its command line.\n\n")
    text = header + "\n".join(section.replace("\n# ", "\n## ").replace("# ", "## ", 1) for section in sections)
    from adaptc.atomic import atomic_write_text

    atomic_write_text(HERE / "RESULTS.md", text)
    print(f"written to {HERE / 'RESULTS.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
