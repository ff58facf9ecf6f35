"""One command that validates a GPU: the Triton kernels, whole models, table placements, the lookup bench and the
sparse training step, each against its threshold, on one H100 or H200 in at most 8 minutes.

    python bench/gpu_check.py --out DIR            # on the GPU; writes DIR/gpu_check.json and DIR/gpu_check.md
    python bench/gpu_check.py --out DIR --smoke    # the same code at tiny sizes on the CPU (Triton's interpreter)

Sections (the checks and sizes are in bench/gpu_check_sections.py):
- kernels: hash (bit-exact against the torch reference and the numpy demo), gather forward and backward in fp32 and
  bf16 and FP8 rows, gate forward and backward, compiled, at the paper's sizes (B x T = 8 x 4096, d_mem 1280);
- models: logits and 64 greedy tokens with the kernels against the torch path, fp32 and bf16, hc_mult 1 and 4,
  with and without the short conv;
- placement: forward tokens/s of a ~0.9B-parameter model with 4.1B table parameters, resident, in pinned host memory
  with and without prefetch, and on disk with prefetch (goal: >= 0.99 of resident);
- lookup: bench/lookup_kernels.py (goal: the hash >= 50x the numpy demo; hash + gather < 2% of a forward);
- train: bench/train_step.py's sparse step at 1e5 and 1e7 table rows (goal: ratio <= 1.3, Adam state <= 2x table).
- fsdp: one rank of FSDP2 beside the row-sharded tables (NCCL), fp32 and bf16, against the whole model: step time, and
  the loss after 13 steps (fp32: within 1e-4 relative; bf16: 2e-2). Several ranks need several GPUs.

Each section runs in its own process with its share of the budget (a kernel that breaks the CUDA context, or hangs,
costs only its section); a check that raises is recorded as failed with its error and the rest goes on. The report
is rewritten after every section. Exit status 0 when every judged check passed and nothing failed or was skipped.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

SECTIONS_SCRIPT = Path(__file__).resolve().parent / "gpu_check_sections.py"
# Seconds of the budget per section, in run order (about 7.5 of the 8 minutes); a section also gets what earlier
# ones left unused. The placement section builds, saves and loads an 8 GB model.
SHARES = {"kernels": 90, "models": 75, "placement": 130, "lookup": 70, "train": 70, "fsdp": 40}
STARTUP = 15  # below this many seconds a section cannot even import torch: skipped


def run_section(name: str, part: Path, timeout: float, smoke: bool) -> tuple[str, float]:
    """(status, seconds) of one section in a fresh process: "ok", "exit N" or "timeout"."""
    env = dict(os.environ)
    if smoke:  # the CPU, even on a GPU machine; kernels in Triton's interpreter
        env.update(CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels, never the interpreter
    command = [sys.executable, str(SECTIONS_SCRIPT), name, "--part", str(part), "--deadline",
               str(time.time() + timeout - 10)] + ["--smoke"] * smoke
    started = time.perf_counter()
    try:
        result = subprocess.run(command, env=env, timeout=timeout)
        status = "ok" if result.returncode == 0 else f"exit {result.returncode}"
    except subprocess.TimeoutExpired:
        status = "timeout"
    return status, round(time.perf_counter() - started, 1)


def section_rows(name: str, part: Path, status: str) -> tuple[list[dict], dict | None]:
    """The section's checks, plus a failed row when its process did not finish cleanly."""
    try:
        data = json.loads(part.read_text())
    except (OSError, ValueError):  # the section stopped before writing anything
        data = {}
    checks = data.get("checks", [])
    if status != "ok":
        checks.append(dict(section=name, check=f"{name} section process", value=None, shown=status, threshold="ok",
                           passed=False, note="stopped at its time budget" if status == "timeout" else
                           "the process failed outside any check (see its output)"))
    return checks, data.get("environment")


def summary(checks: list[dict]) -> dict:
    count = lambda test: sum(1 for c in checks if test(c))  # noqa: E731
    return dict(checks=len(checks), passed=count(lambda c: c["passed"] is True),
                failed=count(lambda c: c["passed"] is False), skipped=count(lambda c: c.get("skipped")),
                not_judged=count(lambda c: c["passed"] is None and not c.get("skipped")))


def markdown(report: dict) -> str:
    env, counts = report["environment"] or {}, report["summary"]
    title = "CPU smoke run (tiny sizes, Triton interpreter: speeds not judged; not GPU numbers)" if report["smoke"] \
        else "GPU run"
    verdict = "all judged checks passed" if report["passed"] else \
        f"{counts['failed']} failed, {counts['skipped']} skipped"
    lines = [
        f"# bench/gpu_check.py: {title}",
        "",
        f"{report['date']}, {env.get('device')}, torch {env.get('torch')}, CUDA {env.get('cuda')}, triton "
        f"{env.get('triton')}, commit {env.get('commit')}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s "
        f"budget. **{verdict}** ({counts['passed']} passed, {counts['not_judged']} recorded without a verdict).",
        "",
        "| section | check | value | threshold | result | seconds | note |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = {True: "pass", False: "**FAIL**", None: "-"}
    for c in report["checks"]:
        result = "skipped" if c.get("skipped") else verdicts[c["passed"]]
        note = c.get("note", "").replace("|", "/")
        seconds = "" if c.get("seconds") is None else c["seconds"]
        lines.append(f"| {c['section']} | {c['check']} | {c['shown']} | {c['threshold']} | {result} | {seconds} "
                     f"| {note} |")
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {s['status']} | {s['seconds']} |" for name, s in report["sections"].items()]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, kernels in Triton's interpreter")
    parser.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 8 minutes)")
    parser.add_argument("--sections", default=",".join(SHARES), help=f"comma-separated subset of {','.join(SHARES)}")
    args = parser.parse_args()
    names = [name for name in args.sections.split(",") if name]
    unknown = set(names) - set(SHARES)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {list(SHARES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = dict(smoke=args.smoke, date=datetime.datetime.now().isoformat(timespec="seconds"), budget_s=args.budget,
                  elapsed_s=0.0, passed=False, environment=None, summary={}, sections={}, checks=[])
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as parts:
        scale = min(1.0, args.budget / sum(SHARES[name] for name in names))  # shares shrink with a smaller budget
        for index, name in enumerate(tqdm(names, desc="gpu_check sections")):
            left = args.budget - (time.perf_counter() - started)
            timeout = left - scale * sum(SHARES[later] for later in names[index + 1 :])  # later sections keep theirs
            if timeout < STARTUP:
                status, seconds = "skipped", 0.0
                report["checks"].append(dict(section=name, check=f"{name} section", value=None, shown="skipped",
                                             threshold="", passed=None, skipped=True,
                                             note="no time left in the budget"))
            else:
                part = Path(parts) / f"{name}.json"
                status, seconds = run_section(name, part, timeout, args.smoke)
                checks, environment = section_rows(name, part, status)
                report["checks"] += checks
                report["environment"] = report["environment"] or environment
            report["sections"][name] = dict(status=status, seconds=seconds)
            report["summary"] = summary(report["checks"])
            report["passed"] = report["summary"]["failed"] == 0 and report["summary"]["skipped"] == 0
            report["elapsed_s"] = round(time.perf_counter() - started, 1)
            (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
            (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    sys.exit(0 if report["passed"] else 1)


if __name__ == "__main__":
    main()
