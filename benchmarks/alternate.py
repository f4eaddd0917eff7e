"""Time two or more commands by running them in turn, round after round, in one session.

Timings of the same command drift by 20-40% (at times more) within minutes on a shared or thermally throttled
machine. Running the commands alternately (A, B, A, B, ...) exposes them to the same drift, and the ratio A / B
taken within each round cancels most of it; the spread of those ratios over the rounds says how far to trust the
median.

A round's time for a command is read from its stdout: a JSON line with "epoch_s_median" (benchmarks/torch_vae.py;
benchmarks/floor.py, whose epoch is its floor), else the last line matching "median epoch <seconds> s" (python
train.py --benchmark). With --wall, every command is timed by its wall-clock time instead, for end-to-end runs such
as python train.py ... --analyze MODEL.

usage:
    python benchmarks/alternate.py [--rounds 5] [--wall] [--json FILE] [--name LABEL] COMMAND [--name LABEL] COMMAND ...
e.g.
    python benchmarks/alternate.py --rounds 5 \\
        --name numpy "python train.py --dataset fashion --data-dir /usr/share/datasets/fashion-mnist --benchmark" \\
        --name torch "/work/torchenv/bin/python benchmarks/torch_vae.py /usr/share/datasets/fashion-mnist --epochs 3"
Give a --name to every command or to none (they are then called cmd1, cmd2, ...). Progress goes to stderr; the
Markdown table of seconds and ratios (first command / each other one) and a summary line per command to stdout.
Standard library only.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time

MEDIAN_EPOCH = re.compile(r"median epoch ([0-9.]+) s")


class CommandError(Exception):
    pass


def seconds_from(stdout):
    """The median epoch seconds a command printed, or None."""
    for line in reversed(stdout.splitlines()):
        try:
            result = json.loads(line)
        except ValueError:
            continue
        if isinstance(result, dict) and result.get("epoch_s_median") is not None:
            return float(result["epoch_s_median"])
    found = MEDIAN_EPOCH.findall(stdout)
    return float(found[-1]) if found else None


def run_once(name, command, wall):
    """Run a shell command to completion; its seconds (printed, or wall-clock with wall). Raises CommandError."""
    t0 = time.perf_counter()
    done = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wall_seconds = time.perf_counter() - t0
    seconds = wall_seconds if wall else seconds_from(done.stdout)
    if done.returncode != 0 or seconds is None:
        what = (f"exited with code {done.returncode}" if done.returncode != 0 else
                "printed no time (no JSON line with epoch_s_median, no 'median epoch N s'; --wall times the whole run)")
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise CommandError(f"{name} ({command}) {what}" + "".join(f"\n    {line}" for line in tail))
    return seconds, wall_seconds


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main():
    p = argparse.ArgumentParser(description="Run commands alternately and compare their epoch times.")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--wall", action="store_true", help="time each command by its wall clock, not what it prints")
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    p.add_argument("--name", action="append", default=[], metavar="LABEL", help="a label for the command after it")
    p.add_argument("commands", nargs="+", metavar="COMMAND", help="a shell command, quoted")
    args = p.parse_intermixed_args()
    if len(args.commands) < 2:
        p.error("give two or more commands to compare")
    if args.name and len(args.name) != len(args.commands):
        p.error(f"{len(args.name)} --name labels for {len(args.commands)} commands: give one to each or to none")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    names = args.name or [f"cmd{i + 1}" for i in range(len(args.commands))]

    seconds = {name: [] for name in names}
    try:
        for r in range(1, args.rounds + 1):
            for name, command in zip(names, args.commands):
                s, wall_seconds = run_once(name, command, args.wall)
                seconds[name].append(s)
                print(f"round {r}/{args.rounds}  {name}: {s:.3f} s  (run {wall_seconds:.1f} s)", file=sys.stderr,
                      flush=True)
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

    first, others = names[0], names[1:]
    # ratio > 1: the first command is slower than that one, by that factor, in the same round
    ratios = {f"{first} / {o}": [a / b for a, b in zip(seconds[first], seconds[o])] for o in others}
    unit = "wall s" if args.wall else "s"
    print("| round | " + " | ".join(f"{n} {unit}" for n in names) + " | " + " | ".join(ratios) + " |")
    print("|---" * (1 + len(names) + len(ratios)) + "|")
    for r in range(args.rounds):
        print(f"| {r + 1} | " + " | ".join(f"{seconds[n][r]:.3f}" for n in names) + " | "
              + " | ".join(f"{ratio[r]:.3f}" for ratio in ratios.values()) + " |")
    print()
    for n in names:
        t = summary(seconds[n])
        line = (f"{n}: median {t['median']:.3f} {unit} [{t['min']:.3f}, {t['max']:.3f}] over {args.rounds} "
                f"round{'s' * (args.rounds != 1)}")
        if n != first:
            q = summary(ratios[f"{first} / {n}"])
            line += f"; {first} / {n}: median {q['median']:.3f} [{q['min']:.3f}, {q['max']:.3f}]"
        print(line)

    if args.json:
        raw = {"rounds": args.rounds, "wall": args.wall,
               "commands": [{"name": n, "command": c, "seconds": seconds[n], **summary(seconds[n])}
                            for n, c in zip(names, args.commands)],
               "ratios": {k: {"per_round": v, **summary(v)} for k, v in ratios.items()}}
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
