"""Results of a gpu-check run: the console table, results.json, results.md and an optional junit XML.

Every file is written to a temporary name and renamed, so a killed run never leaves half a report."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

COLUMNS = ("recipe", "check", "status", "summary")


def format_table(rows: list[dict]) -> str:
    """Fixed-width text table, one line per row."""
    widths = {c: max([len(c)] + [len(str(row.get(c, ""))) for row in rows]) for c in COLUMNS[:-1]}
    lines = ["  ".join(c.ljust(widths[c]) for c in COLUMNS[:-1]) + "  summary"]
    for row in rows:
        cells = [str(row.get(c, "")).ljust(widths[c]) for c in COLUMNS[:-1]]
        lines.append("  ".join(cells) + "  " + str(row.get("summary", "")))
    return "\n".join(lines)


def markdown(rows: list[dict], meta: dict) -> str:
    out = [
        f"# GPU check: {meta.get('device_name')} ({meta.get('device')})",
        "",
        f"torch {meta.get('torch')}, Python {meta.get('python')}, commit `{meta.get('git_commit')}`, "
        f"bf16 matmul peak {meta.get('peak_tflops_bf16', float('nan')):.1f} TFLOP/s "
        f"(n={meta.get('peak_matmul_n')}), started {meta.get('started_utc')}, wall {meta.get('wall_s')} s. "
        f"Wheels: {meta.get('wheels')}.",
        "",
        "| recipe | check | status | summary |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        summary = str(row.get("summary", "")).replace("|", "\\|")
        out.append(f"| {row['recipe']} | {row['check']} | {row['status']} | {summary} |")
    out += ["", "Full numbers (metrics of each row) are in results.json.", ""]
    return "\n".join(out)


def junit(rows: list[dict]) -> ET.ElementTree:
    """One testcase per row: FAIL -> <failure>, SKIP -> <skipped>, with the summary as message."""
    failures = sum(row["status"] == "FAIL" for row in rows)
    skipped = sum(row["status"] == "SKIP" for row in rows)
    suite = ET.Element(
        "testsuite", name="gpu-check", tests=str(len(rows)), failures=str(failures), errors="0", skipped=str(skipped)
    )
    for row in rows:
        case = ET.SubElement(suite, "testcase", classname=f"gpu_check.{row['recipe']}", name=row["check"])
        case.set("time", str(row.get("seconds", 0.0)))
        if row["status"] == "FAIL":
            ET.SubElement(case, "failure", message=str(row.get("summary", "")))
        elif row["status"] == "SKIP":
            ET.SubElement(case, "skipped", message=str(row.get("summary", "")))
    return ET.ElementTree(suite)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_reports(out_dir: Path, rows: list[dict], meta: dict, junit_path: Path | None = None) -> str:
    """Write results.json / results.md (and junit_path); returns the console table."""
    _write_text(out_dir / "results.json", json.dumps({"meta": meta, "rows": rows}, indent=1, default=str) + "\n")
    _write_text(out_dir / "results.md", markdown(rows, meta))
    if junit_path is not None:
        tmp = junit_path.with_name(f".{junit_path.name}.tmp")
        junit(rows).write(tmp, encoding="utf-8", xml_declaration=True)
        os.replace(tmp, junit_path)
    return format_table(rows)
