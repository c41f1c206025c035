"""Dry-run planning time and memory over synthetic TCGA-sized cohorts (a benchmark; prints JSON).

Writes sample sheets of GDC-style rows (made-up UUIDs and md5s, never shipped) spread over the 14 seed
cancer types, then times ``snakemake -n`` on them in a fresh process and reads its peak RSS.

    python benchmarks/dag_planning.py                 # 100, 1,000 and 5,060 slides
    python benchmarks/dag_planning.py --slides 5060
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from nucseg.download import SEED_PROJECTS  # noqa: E402


def write_cohort(root: Path, n_slides: int) -> None:
    """Sheets for ``n_slides`` slides over the seed types, and a config naming them."""
    (root / "config" / "cohorts").mkdir(parents=True)
    rows = {t: [] for t in SEED_PROJECTS}
    for i in range(n_slides):
        t = SEED_PROJECTS[i % len(SEED_PROJECTS)]
        file_id = str(uuid.UUID(int=i + 1))
        barcode = f"TCGA-{i % 97:02d}-{i:04d}-01Z-00-DX1"
        rows[t].append(f"{barcode}\t{t}\t{file_id}\t{barcode}.{file_id.upper()}.svs\t{i:032x}\t{10**8 + i}\tDX")
    cohorts = {}
    for t, lines in rows.items():
        if not lines:
            continue
        path = root / "config" / "cohorts" / f"{t}.tsv"
        path.write_text("slide_id\tcancer_type\tsource\tfile_name\tmd5\tsize\tslide_type\n" + "\n".join(lines) + "\n")
        cohorts[t] = f"config/cohorts/{t}.tsv"
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config.pop("demo", None)
    config["cohorts"] = cohorts
    (root / "config" / "config.yaml").write_text(yaml.safe_dump(config))


def plan(root: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(root), "-n",
                           "--quiet", "rules", "--cores", "2"], capture_output=True, text=True, cwd=root)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    jobs = {r: int(n) for r, n in re.findall(r"^([A-Za-z_]\w*)\s+(\d+)$", proc.stdout, re.M)}
    return {"seconds": round(wall, 2), "peak_rss_mb": round(max(rss, before) / 1024, 1),
            "rss_grew": rss > before, "jobs": jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, nargs="+", default=[100, 1000, 5060])
    args = parser.parse_args()
    results = []
    # Smallest first: the children's peak RSS only grows, so each figure is that run's own peak.
    for n in sorted(args.slides):
        with tempfile.TemporaryDirectory() as tmp:
            write_cohort(Path(tmp), n)
            results.append({"slides": n, **plan(Path(tmp))})
    print(json.dumps({"snakemake": __import__("snakemake").__version__, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
