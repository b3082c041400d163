"""Blocklist benches: compile time and memory, serving memory, and swapping under load.

    python -m bench.lists compile --data ../shared/data --runs 3
    python -m bench.lists compile --synthetic 10000000 --runs 1
    python -m bench.lists memory --synthetic 10000000
    python -m bench.lists swap --data ../shared/data --runs 3

compile: `bns lists compile` as a process (wall time, peak RSS from wait4, artifact size), beside the naive
way of holding the same names, a Python set of reversed names, measured in the same run.
memory: a worker's RSS and PSS (proportional: shared pages split between the processes mapping them) with
no list and with the artifact, for one and two workers, after a lookup workload has touched the trie.
swap: two workers under a dnsperf load; a new artifact is installed by rename; the time until every worker
answers from it, and the queries lost or failed meanwhile.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gzip
import os
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import DEFAULT_DATA, bns_command, free_port, machine, median, running, top_site_names
from bench.load import run_dnsperf, write_query_file

_TLDS = ["com", "net", "org", "ru", "de", "xyz", "info", "top", "io", "co.uk", "com.br", "online", "site"]


def synthetic_names(count: int, path: Path, style: str = "random", data: Path = DEFAULT_DATA, seed: int = 1) -> Path:
    """`count` distinct names written to `path`, one per line.

    random: labels of 3–14 random letters and digits under 0–2 random subdomains: no two names share more
    than a TLD, so the trie cannot compress them (the worst case: DGA-like malware names only).
    realistic: built from the labels of the 1.43 M real names of all-open.tsv.gz: 40 % new subdomains of
    real registrable domains, 40 % new domains made of one or two real labels on a real TLD (drawn with the
    real TLD frequencies), 10 % the real names themselves, 10 % random DGA-like names."""
    rng = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits

    def random_label(low: int, high: int) -> str:
        return "".join(rng.choices(alphabet, k=rng.randint(low, high)))

    source = data / "blocklists" / "all-open.tsv.gz"
    if style == "realistic" and not source.exists():
        raise SystemExit(f"{source} is needed for --style realistic")
    real: list[str] = []
    labels: list[str] = []
    tlds: list[str] = []
    if style == "realistic":
        with gzip.open(source, "rt") as lines:
            real = [line.split("\t", 1)[0] for line in lines]
        for name in real:
            parts = name.split(".")
            labels.extend(parts[:-1])
            tlds.append(parts[-1])
        rng.shuffle(real)
    seen: set[int] = set()
    written = 0
    with path.open("w") as out:
        while written < count:
            if style == "random":
                subdomains = "".join(random_label(2, 8) + "." for _ in range(rng.choice((0, 0, 1, 2))))
                name = f"{subdomains}{random_label(3, 14)}.{rng.choice(_TLDS)}"
            else:
                roll = rng.random()
                if roll < 0.4:
                    base = ".".join(rng.choice(real).split(".")[-2:])
                    name = ".".join(rng.choice(labels) for _ in range(rng.randint(1, 2))) + "." + base
                elif roll < 0.8:
                    word = (
                        rng.choice(labels) + rng.choice(("", "-", "")) + rng.choice(labels)
                        if rng.random() < 0.6
                        else rng.choice(labels)
                    )
                    name = f"{word[:63]}.{rng.choice(tlds)}"
                elif roll < 0.9 and written < len(real):
                    name = real[written]
                else:
                    name = f"{random_label(8, 16)}.{rng.choice(_TLDS)}"
            key = hash(name)
            if key in seen or len(name) > 253:
                continue
            seen.add(key)
            out.write(name + "\n")
            written += 1
    return path


def measured(command: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in MB) of a child process."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(command)} failed")
    return time.monotonic() - started, usage.ru_maxrss // 1024


# The naive compiler: every name in a dict (reversed name -> category bits), then the same trie build.
_NAIVE = """
import gzip, sys, marisa_trie
names = {}
for bit, path in enumerate(sys.argv[1:]):
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as lines:
        for line in lines:
            name = line.strip().lower()
            if name:
                key = ".".join(reversed(name.split("."))) + "."
                names[key] = names.get(key, 0) | 1 << bit
trie = marisa_trie.Trie(names)
print(len(trie))
"""


def bench_compile(args: argparse.Namespace, scratch: Path) -> str:
    if args.synthetic:
        inputs = [synthetic_names(args.synthetic, scratch / "synthetic.txt", args.style, args.data)]
        source_args = ["--source", f"malware={inputs[0]}"]
        what = (
            f"{args.synthetic:,} synthetic names, {args.style} style "
            f"(one plain file, {inputs[0].stat().st_size / 1e6:.0f} MB)"
        )
    else:
        directory = args.data / "blocklists"
        inputs = sorted(directory.glob("*.txt.gz"))
        source_args = ["--source-dir", str(directory)]
        what = f"the {len(inputs)} category files of {directory} (--source-dir)"
    out = scratch / "lists.bns"
    rows = {"bns lists compile": [], "naive: dict of every name, then the same trie build": []}
    for _ in range(args.runs):
        rows["bns lists compile"].append(
            measured([sys.executable, "-m", "resolver", "lists", "compile", "--out", str(out), *source_args])
        )
        rows["naive: dict of every name, then the same trie build"].append(
            measured([sys.executable, "-c", _NAIVE, *map(str, inputs)])
        )
    size = out.stat().st_size / 1e6
    compiled, naive = rows["bns lists compile"], rows["naive: dict of every name, then the same trie build"]
    lines = [
        f"Input: {what}. Medians of {args.runs} run(s). Artifact: {size:.1f} MB.",
        "",
        "| | wall s | peak RSS MB |",
        "|---|---:|---:|",
    ]
    for label, values in rows.items():
        lines.append(f"| {label} | {median([v[0] for v in values]):.1f} | {median([v[1] for v in values]):.0f} |")
    ratio = median([v[1] for v in compiled]) / median([v[1] for v in naive])
    lines.append(
        f"\nPeak RSS of the compiler / the naive one: {ratio:.2f}×. "
        f"Per run (s, MB): compile {[(round(t, 1), m) for t, m in compiled]}, "
        f"naive {[(round(t, 1), m) for t, m in naive]}"
    )
    if args.keep:
        out.replace(args.keep)
    return "\n".join(lines)


def _memory_of(pid: int, artifact: Path | None) -> tuple[float, float, float, float]:
    """(RSS, PSS, artifact mapping RSS, artifact mapping PSS) in MB, summed over the workers of `pid`."""
    totals = [0.0, 0.0, 0.0, 0.0]
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        for line in Path(f"/proc/{child}/smaps_rollup").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("Rss", "Pss"):
                totals[0 if key == "Rss" else 1] += int(value.split()[0]) / 1024
        in_artifact = False
        for line in Path(f"/proc/{child}/smaps").read_text().splitlines():
            if "-" in line.split(" ", 1)[0]:  # a mapping's header line
                in_artifact = artifact is not None and line.rstrip().endswith(str(artifact))
            elif in_artifact and line.startswith(("Rss:", "Pss:")):
                totals[2 if line.startswith("Rss") else 3] += int(line.split()[1]) / 1024
    return totals[0], totals[1], totals[2], totals[3]


def bench_memory(args: argparse.Namespace, scratch: Path) -> str:
    artifact = args.artifact
    names = scratch / "synthetic.txt"
    if artifact is None:
        synthetic_names(args.synthetic, names, args.style, args.data)
        artifact = scratch / "lists.bns"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "resolver",
                "lists",
                "compile",
                "--out",
                str(artifact),
                "--source",
                f"malware={names}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    listed = [line.strip() for _, line in zip(range(100_000), names.open(), strict=False)] if names.exists() else []
    workload = write_query_file(top_site_names(args.data, 100_000) + listed, scratch / "memory-queries.txt")
    # No answer cache: with one, names blocked in one run are cached in the other and the difference is
    # no longer the list's.
    config = scratch / "no-cache.toml"
    config.write_text("[cache]\nsize = 0\n")
    upstream_port = free_port()
    rows = []
    upstream = [sys.executable, "-m", "bench.upstream", "--port", str(upstream_port), "--ttl", "86400"]
    with running(upstream, upstream_port):
        for workers in (1, 2):
            for lists in (None, artifact):
                port = free_port()
                extra = ["--config", str(config), *(["--lists", str(lists)] if lists else [])]
                with running(bns_command(port, upstream_port, workers, *extra), port) as pid:
                    run_dnsperf(port, workload, runs=1, clients=32, outstanding=200)
                    time.sleep(0.5)
                    rows.append((workers, "artifact" if lists else "none", *_memory_of(pid, lists)))
    size = artifact.stat().st_size / 1e6
    by = {(workers, lists): (rss, pss) for workers, lists, rss, pss, _, _ in rows}
    lines = [
        f"Artifact: {size:.1f} MB ({args.synthetic:,} synthetic names, {args.style} style). "
        f"Workload: 100k top sites + {len(listed):,} listed names, once, through each server before "
        f"measuring; answer cache off (cache.size = 0) so that the list is the only difference.",
        "",
        "| workers | lists | RSS MB | PSS MB | artifact mapping RSS MB | artifact mapping PSS MB |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {w} | {lists} | {rss:.0f} | {pss:.0f} | {map_rss:.0f} | {map_pss:.0f} |"
        for w, lists, rss, pss, map_rss, map_pss in rows
    ]
    one_rss = by[(1, "artifact")][0] - by[(1, "none")][0]
    one = by[(1, "artifact")][1] - by[(1, "none")][1]
    two = by[(2, "artifact")][1] - by[(2, "none")][1]
    lines.append(
        f"\nWith the list, one worker grows by {one_rss:.0f} MB RSS ({one:.0f} MB PSS); two workers "
        f"together grow by {two:.0f} MB PSS: {two / one:.2f}× one. (RSS and PSS are summed over all "
        f"workers; PSS splits each shared page between the processes that map it.)"
    )
    return "\n".join(lines)


def _canary_answers(port: int, name: str, tries: int = 64) -> bool:
    """True when every one of `tries` fresh sockets (spread over the workers) gets the name blocked."""
    import dns.message
    import dns.query
    import dns.rcode

    for _ in range(tries):
        response = dns.query.udp(dns.message.make_query(name, "A"), "127.0.0.1", port=port, timeout=2)
        if response.rcode() != dns.rcode.NXDOMAIN:
            return False
    return True


def bench_swap(args: argparse.Namespace, scratch: Path) -> str:
    directory = args.data / "blocklists"
    live, canary_list = scratch / "live.bns", scratch / "canary.txt"
    compile_cmd = [sys.executable, "-m", "resolver", "lists", "compile", "--source-dir", str(directory)]
    subprocess.run([*compile_cmd, "--out", str(live)], check=True, stdout=subprocess.DEVNULL)
    workload = write_query_file(top_site_names(args.data, 10_000), scratch / "swap-queries.txt")
    upstream_port, port = free_port(), free_port()
    upstream = [sys.executable, "-m", "bench.upstream", "--port", str(upstream_port), "--ttl", "86400"]
    times, results = [], []
    with running(upstream, upstream_port), running(bns_command(port, upstream_port, 2, "--lists", str(live)), port):
        run_dnsperf(port, workload, runs=1, clients=32, outstanding=500)  # warm the cache
        for run in range(args.runs):
            canary = f"swap-canary-{run}.example"
            canary_list.write_text(f"{canary}\n")
            staged = scratch / f"next{run}.bns"
            subprocess.run(
                [*compile_cmd, "--source", f"malware={canary_list}", "--out", str(staged)],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                load = pool.submit(
                    run_dnsperf, port, workload, seconds=args.seconds, clients=32, outstanding=200, max_qps=args.qps
                )
                time.sleep(args.seconds / 3)
                installed = time.monotonic()
                staged.replace(live)
                while not _canary_answers(port, canary):
                    time.sleep(0.01)
                times.append(time.monotonic() - installed)
                results.append(load.result())
    lost = sum(r.lost for r in results)
    # NXDOMAIN is a blocked top site (about 3 % of them are listed): an answer, not a failure.
    failed = sum(count for r in results for code, count in r.rcodes.items() if code not in ("NOERROR", "NXDOMAIN"))
    sent = sum(r.sent for r in results)
    return (
        f"Two workers serving the 1.05 M-name artifact under dnsperf ({args.qps} qps, cached workload, "
        f"{args.seconds} s per run); a new 1.05 M-name artifact installed by rename mid-run.\n\n"
        f"Time from rename to every worker answering from the new list: median {median(times):.2f} s "
        f"(runs: {[round(t, 2) for t in times]}; the watcher polls every 1 s, so up to 1 s of it is the poll).\n"
        f"Queries during the runs: {sent:,} sent, {lost:,} lost, {failed:,} answered SERVFAIL, REFUSED or FORMERR."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("compile", "memory", "swap"))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--synthetic", type=int, default=0, help="use this many synthetic names instead")
    parser.add_argument(
        "--style",
        choices=("realistic", "random"),
        default="realistic",
        help="synthetic names: recombined real labels, or random labels (the worst case)",
    )
    parser.add_argument("--artifact", type=Path, help="memory: measure this artifact instead of compiling one")
    parser.add_argument("--keep", type=Path, help="compile: keep the artifact here")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=9.0)
    parser.add_argument("--qps", type=int, default=30_000)
    args = parser.parse_args(argv)
    if args.what == "memory" and not args.synthetic and not args.artifact:
        args.synthetic = 10_000_000
    resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
    with tempfile.TemporaryDirectory(prefix="bns-bench-") as tmp:
        text = {"compile": bench_compile, "memory": bench_memory, "swap": bench_swap}[args.what](args, Path(tmp))
    command = "python -m bench.lists " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"Command: `{command}`  \nMachine: {machine()}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
