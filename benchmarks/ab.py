"""Did a change keep the serving speed? The same HTTP load on two versions of Tertulia, in one run.

    python benchmarks/ab.py --base REF [--levels 1 16] [--tokens 64] [--rounds 5]

The commit REF is unpacked into a temporary directory (`git archive`) and served by the same Python,
with the same TERTULIA_HOME, as the working tree. Both servers run at once on loopback (an idle one
costs nothing) and are measured in turns, ABBA, so that drift in a noisy machine hits both alike. Each
turn is one round of `serve_load.py`: `level` concurrent greedy streaming chats of `tokens` tokens.
Prints and records (results/ab.json) the median aggregate tok/s and TTFT p95 of each, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

from machine import describe
from serve_load import alternate, free_port, medians_of, start

ROOT = Path(__file__).resolve().parent.parent
RESULT = Path(__file__).parent / "results" / "ab.json"


def unpack(ref: str, into: Path) -> str:
    """The package as it was at `ref`, under `into`; returns the short commit."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = subprocess.run(
        ["git", "archive", commit, "tertulia"], cwd=ROOT, capture_output=True, check=True
    )
    with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
        tar.extractall(into, filter="data")
    build_native(into)
    return commit


def build_native(tree: Path) -> None:
    """Give the unpacked package its C++ decode stack, as `make` gives the working tree's: the builds
    beside this tree's source are copied first (one whose source is unchanged is then reused), and
    whatever is missing is compiled. A commit from before the stack has nothing to build."""
    if not (tree / "tertulia" / "engine" / "native.py").is_file():
        return
    ours = ROOT / "tertulia" / "engine" / "csrc" / "build"
    if ours.is_dir():
        shutil.copytree(ours, tree / "tertulia" / "engine" / "csrc" / "build", dirs_exist_ok=True)
    # Run from the tree: `python -m` puts the working directory first on sys.path, so run from
    # anywhere else it would build (and below, serve) whatever package that directory holds.
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run(
        [sys.executable, "-m", "tertulia.engine.native"], env=env, cwd=tree, check=True, capture_output=True
    )


def serve(tree: Path) -> tuple[str, subprocess.Popen]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, "-m", "tertulia", "serve", "--port", str(port), "--max-batch", "16"]
    url = f"http://127.0.0.1:{port}"
    return url, start(command, f"{url}/health", env, cwd=tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare the working tree with")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tertulia-ab-") as temporary:
        base_tree = Path(temporary)
        base_commit = unpack(args.base, base_tree)
        servers = {f"base {base_commit}": serve(base_tree), "this tree": serve(ROOT)}
        try:
            endpoints = {name: (url, "smollm2-135m") for name, (url, _) in servers.items()}
            runs = alternate(endpoints, args.levels, args.tokens, args.rounds)
        finally:
            for _, process in servers.values():
                process.terminate()
    medians = medians_of(runs)
    base_name, this_name = list(servers)
    ratios = {
        str(n): medians[this_name][str(n)]["tok/s"] / medians[base_name][str(n)]["tok/s"] for n in args.levels
    }
    record = {
        "machine": describe(),
        "settings": {
            "base": base_commit,
            "levels": args.levels,
            "tokens": args.tokens,
            "rounds": args.rounds,
        },
        "runs": {name: {str(n): r for n, r in by_level.items()} for name, by_level in runs.items()},
        "medians": medians,
        "ratio_tok_s": ratios,
    }
    RESULT.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n| streams | {base_name} tok/s | this tree tok/s | ratio |")
    print("|---|---|---|---|")
    for n in args.levels:
        base, this = medians[base_name][str(n)]["tok/s"], medians[this_name][str(n)]["tok/s"]
        print(f"| {n} | {base:.1f} | {this:.1f} | {ratios[str(n)]:.2f}× |")
    print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
