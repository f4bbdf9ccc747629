"""Turn a pytest-benchmark JSON into a short markdown table, ratios against the peer.

Within each benchmark group the row whose extra_info has ``baseline: true`` is the
peer; every row's speed-up is peer median / row median, from the same run.
Usage: python benchmarks/report.py RESULTS.json [--out RESULTS.md]
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict
from pathlib import Path


def device_name(machine_info: dict) -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = machine_info.get("cpu", {})
    brand = cpu.get("brand_raw") or platform.processor() or machine_info.get("machine", "cpu")
    return f"CPU: {brand}, {cpu.get('count', '?')} cores"


def render(results: dict) -> str:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in results["benchmarks"]:
        groups[bench.get("group") or bench["name"]].append(bench)
    lines = [
        f"Device: {device_name(results.get('machine_info', {}))}",
        f"Run: {results.get('datetime', '?')}, Python {results.get('machine_info', {}).get('python_version', '?')}",
        "",
    ]
    for group, benches in groups.items():
        base = next((b for b in benches if b.get("extra_info", {}).get("baseline")), None)
        lines += [
            f"### {group}",
            "",
            "| provider | median | min | rounds | speed-up vs peer | notes |",
            "|---|---|---|---|---|---|",
        ]
        for b in benches:
            info = dict(b.get("extra_info", {}))
            stats = b["stats"]
            ratio = f"{base['stats']['median'] / stats['median']:.2f}x" if base else "-"
            provider = info.pop("provider", b["name"])
            info.pop("baseline", None)
            notes = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items())
            lines.append(
                f"| {provider} | {stats['median'] * 1e3:.2f} ms | {stats['min'] * 1e3:.2f} ms | {stats['rounds']} | {ratio} | {notes} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json_path", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = render(json.loads(args.json_path.read_text()))
    out = args.out or args.json_path.with_suffix(".md")
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
