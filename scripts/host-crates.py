#!/usr/bin/env python3
"""The crates attractor's build only runs on the host (proc macros, build-script helpers and what
only they depend on), for the opt-level 0 overrides in Cargo.toml.

    scripts/host-crates.py           print the [profile.dev.package.NAME] lines
    scripts/host-crates.py --check   exit 1 (naming them) if Cargo.toml lacks some

Rule: a package is host-only when every path to it from attractor goes through a proc-macro
crate or a build-dependency edge. A name that also has a version linked into attractor is left
out (a profile override names every version of a package).
"""
import json
import re
import subprocess
import sys
from pathlib import Path

root_dir = Path(__file__).resolve().parent.parent
meta = json.loads(
    subprocess.run(
        ["cargo", "metadata", "--format-version", "1", "--locked", "--offline"],
        cwd=root_dir, check=True, capture_output=True, text=True,
    ).stdout
)
packages = {p["id"]: p for p in meta["packages"]}
nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
root = meta["resolve"]["root"]


def proc_macro(pid):
    return any("proc-macro" in t["kind"] for t in packages[pid]["targets"])


linked, stack = set(), [root]
while stack:
    pid = stack.pop()
    if pid in linked:
        continue
    linked.add(pid)
    for dep in nodes[pid]["deps"]:
        kinds = [k["kind"] for k in dep["dep_kinds"]]
        if not any(k is None or (k == "dev" and pid == root) for k in kinds):
            continue
        if not proc_macro(dep["pkg"]):
            stack.append(dep["pkg"])

linked_names = {packages[p]["name"] for p in linked}
host = sorted({packages[p]["name"] for p in nodes if p not in linked} - linked_names)

if "--check" in sys.argv:
    toml = (root_dir / "Cargo.toml").read_text()
    have = set(re.findall(r'^\[profile\.dev\.package\."?([A-Za-z0-9_-]+)"?\]\nopt-level = 0$', toml, re.M))
    missing = [n for n in host if n not in have]
    if missing:
        print("Cargo.toml lacks opt-level 0 overrides for: " + ", ".join(missing))
        sys.exit(1)
    print(f"ok: all {len(host)} host-only crates are at opt-level 0")
else:
    for n in host:
        print(f"[profile.dev.package.{n}]\nopt-level = 0")
