"""Long-running fuzzer of refghost's readers: counts per reader, hangs and peak memory.

    python tools/fuzz.py --seconds 600 [--kinds weights,golden,...] [--seed 0] [--timeout 20]
                         [--memory-gib 4] [--show 3]
    python tools/fuzz.py --cases 3 ...   # exactly 3 cases per reader, whatever the machine's speed

Each case is a byte-level mutant (``refghost.testing.fuzz.mutate_bytes``) or, for HDF5 kinds,
a structural one (``mutate_structure``) of a seed file (the shipped weights, a small golden,
candidates derived from it, a checkpoint). Cases run in a worker process whose address space is
capped (``--memory-gib``: an allocation beyond it is a MemoryError, counted as an "other"
exception); a case that takes longer than ``--timeout`` seconds is a hang: the worker is killed
and restarted. A reader passes when every case returns or raises a RefghostError.

Prints, per reader: cases, documented errors, successes, other exceptions, hangs, the worker's
peak RSS, and the first few "other" messages. Exit status 1 if any reader had another exception
or a hang.

``--atheris KIND`` fuzzes one reader coverage-guided with atheris (libFuzzer; its guidance sees
refghost's and zipfile's Python, not HDF5's C): libFuzzer's ``-timeout`` and ``-rss_limit_mb``
catch hangs and memory blow-ups, and any exception other than RefghostError stops it.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refghost.testing import fuzz  # noqa: E402


def _worker(conn, seeds, memory_bytes):
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    readers = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        kind, path = msg
        if kind not in readers:
            readers[kind] = fuzz.reader(kind, seeds)
        outcome, detail = fuzz.verdict(readers[kind], path)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        conn.send((outcome, detail[:300], peak))


class Worker:
    def __init__(self, seeds, memory_bytes):
        self.seeds, self.memory_bytes = seeds, memory_bytes
        self.start()

    def start(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.seeds, self.memory_bytes), daemon=True)
        self.proc.start()

    def run(self, kind, path, timeout):
        self.conn.send((kind, os.fspath(path)))
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
        else:
            self.proc.kill()
            self.proc.join()
            self.start()
            return "hang", f"> {timeout} s", 0
        self.proc.join()  # the worker died (a crash in C code)
        code = self.proc.exitcode
        self.start()
        return "other", f"worker died with exit code {code}", 0

    def stop(self):
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()


def run_atheris(kind: str, seconds: float, timeout: float, memory_gib: float, seed: int) -> int:
    """Coverage-guided fuzzing of one reader with atheris (libFuzzer): any exception other than
    RefghostError is a crash, ``-timeout`` a hang, ``-rss_limit_mb`` a memory blow-up; libFuzzer
    prints its own counts (``#N ... exec/s``) and stops at the first finding."""
    import atheris

    tmp = Path(tempfile.mkdtemp(prefix="refghost-atheris-"))
    seeds = fuzz.make_seeds(tmp / "seeds")
    read = fuzz.reader(kind, seeds)
    case = tmp / "cases" / seeds[kind].name
    case.parent.mkdir()
    seed_bytes = seeds[kind].read_bytes()
    counts = {"cases": 0, "documented": 0, "ok": 0}

    deadline = []  # set at the first input, after instrumentation (which takes a while)

    def one_input(data: bytes):
        if not deadline:
            deadline.append(time.monotonic() + seconds)
        if time.monotonic() > deadline[0]:
            report()
            os._exit(0)
        case.write_bytes(data)  # libFuzzer mutates the file itself, starting from the seed
        counts["cases"] += 1
        outcome, detail = fuzz.verdict(read, case)
        if outcome == "other":
            raise RuntimeError(f"{kind}: {detail}")
        counts[outcome] += 1
        if counts["cases"] % 1000 == 0:
            report()

    def report():
        print(f"{kind}: {counts['cases']} cases, {counts['documented']} documented errors, {counts['ok']} "
              f"successes, 0 other exceptions", file=sys.stderr, flush=True)

    corpus = tmp / "corpus"
    corpus.mkdir()
    (corpus / "seed").write_bytes(seed_bytes)
    flags = [sys.argv[0], str(corpus), f"-timeout={int(timeout)}",
             f"-rss_limit_mb={int(memory_gib * 1024)}", f"-seed={seed + 1}", "-max_len=" + str(len(seed_bytes) + 4096)]
    atheris.instrument_all()  # coverage of every loaded Python function: refghost, zipfile, numpy's format
    atheris.Setup(flags, one_input)
    atheris.Fuzz()
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600, help="total run time, shared by the readers")
    parser.add_argument("--cases", type=int, help="run exactly this many cases per reader (then --seconds is "
                        "ignored): the same cases and counts on any machine, for a given --seed")
    parser.add_argument("--kinds", default=",".join(fuzz.KINDS), help="comma-separated readers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=20, help="seconds after which a case is a hang")
    parser.add_argument("--memory-gib", type=float, default=4, help="address-space cap of the worker")
    parser.add_argument("--show", type=int, default=3, help="'other' messages to print per reader")
    parser.add_argument("--atheris", metavar="KIND", help="coverage-guided fuzzing of one reader with atheris "
                        "(pip install atheris) instead of the mutation loop")
    args = parser.parse_args(argv)
    if args.atheris:
        return run_atheris(args.atheris, args.seconds, args.timeout, args.memory_gib, args.seed)
    kinds = [k for k in args.kinds.split(",") if k]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="refghost-fuzz-") as tmp:
        tmp = Path(tmp)
        seeds = fuzz.make_seeds(tmp / "seeds")
        seed_bytes = {k: seeds[k].read_bytes() for k in kinds}
        cases = tmp / "cases"
        cases.mkdir()
        worker = Worker(seeds, int(args.memory_gib * 2 ** 30))
        counts = {k: {"cases": 0, "byte": 0, "structural": 0, "documented": 0, "ok": 0, "other": 0, "hang": 0,
                      "peak": 0, "examples": []} for k in kinds}
        deadline = time.monotonic() + args.seconds
        slowest = {k: 0.0 for k in kinds}
        i = 0

        def more() -> bool:
            if args.cases is not None:
                return any(counts[k]["cases"] < args.cases for k in kinds)
            return time.monotonic() < deadline

        try:
            while more():
                kind = kinds[i % len(kinds)]
                i += 1
                if args.cases is not None and counts[kind]["cases"] >= args.cases:
                    continue
                case = cases / seeds[kind].name  # (the .npy candidate's name says which output it is)
                structural = fuzz.SUFFIX[kind] == ".h5" and rng.random() < 0.4
                if structural:
                    try:
                        what = fuzz.mutate_structure(seeds[kind], case, rng)
                    except Exception as exc:  # noqa: BLE001 - h5py could not make this edit
                        continue
                else:
                    case.write_bytes(fuzz.mutate_bytes(seed_bytes[kind], rng))
                    what = "bytes"
                c = counts[kind]
                c["cases"] += 1
                c["structural" if structural else "byte"] += 1
                t0 = time.monotonic()
                outcome, detail, peak = worker.run(kind, case, args.timeout)
                slowest[kind] = max(slowest[kind], time.monotonic() - t0)
                c[outcome] += 1
                c["peak"] = max(c["peak"], peak)
                if outcome in ("other", "hang") and len(c["examples"]) < args.show:
                    keep = tmp.parent / f"refghost-fuzz-{kind}-{c['cases']}{fuzz.SUFFIX[kind]}"
                    case.replace(keep)
                    c["examples"].append(f"{what}: {detail} (kept as {keep})")
        finally:
            worker.stop()
    print(f"{'reader':<16}{'cases':>8}{'byte':>8}{'struct':>8}{'documented':>12}{'ok':>6}{'other':>7}{'hangs':>7}"
          f"{'slowest s':>11}{'peak RSS MiB':>14}")
    bad = False
    for kind, c in counts.items():
        print(f"{kind:<16}{c['cases']:>8}{c['byte']:>8}{c['structural']:>8}{c['documented']:>12}{c['ok']:>6}"
              f"{c['other']:>7}{c['hang']:>7}{slowest[kind]:>11.2f}{c['peak'] / 2 ** 20:>14.0f}")
        for example in c["examples"]:
            print(f"    {example}")
        bad |= bool(c["other"] or c["hang"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
