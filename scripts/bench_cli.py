"""Wall time of the `trb-trl` answers a newcomer waits for before any training starts.

```bash
python scripts/bench_cli.py --repeats 5
```

Times, as subprocesses of the installed `trb-trl` command: `trb-trl --help`, `trb-trl train --help`, a recipe with a
mistyped key, and a mistyped command-line option. These are answered from the shipped option schema
(`trb_trl/config_schema.json`) without importing torch, TRL or transformers; the floor is about one second each. The
median of `--repeats` runs is printed per command, with the first line of what it printed to stderr.
"""

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="Runs per command; the median is reported.")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    command = shutil.which("trb-trl") or f"{sys.executable} -m trb_trl.cli"
    with tempfile.TemporaryDirectory() as scratch:
        typo = Path(scratch) / "typo.yaml"
        typo.write_text((REPO / "recipes" / "qwen3_1p7b.yaml").read_text().replace("trb_epsilon:", "trb_epsilo:"))
        cases = {
            "trb-trl --help": ["--help"],
            "trb-trl train --help": ["train", "--help"],
            "recipe with a mistyped key": ["train", str(typo)],
            "mistyped option": ["train", str(REPO / "recipes" / "tiny_cpu.yaml"), "--trb_epsilo", "0.1"],
        }
        print(f"{'command':<30} {'median s':>9}  first stderr line")
        for name, arguments in cases.items():
            times, stderr = [], ""
            for _ in range(args.repeats):
                start = time.perf_counter()
                result = subprocess.run([*command.split(), *arguments], capture_output=True, text=True, cwd=REPO)
                times.append(time.perf_counter() - start)
                stderr = (result.stderr.strip().splitlines() or [""])[0]
            print(f"{name:<30} {statistics.median(times):>9.2f}  {stderr[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
