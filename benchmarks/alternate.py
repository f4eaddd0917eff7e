"""Time two or more commands by running them in turn, round after round, in one session.

Timings of the same command drift by 20-40% (at times more) within minutes on a shared or thermally
throttled machine. Running the commands alternately (A, B, A, B, ...) exposes them to the same
drift, and the ratio A / B taken within each round cancels most of it; the spread of those ratios
over the rounds says how far to trust the median.

A round's time for a command is read from its stdout: a JSON line with "epoch_s_median"
(benchmarks/torch_vae.py; benchmarks/floor.py, whose epoch is its floor), else the last line
matching "median epoch <seconds> s" (python -m lab --benchmark). With --wall, every command is
timed by its wall-clock time instead, for end-to-end runs such as python -m lab ... --analyze
MODEL.

usage:
    python benchmarks/alternate.py [--rounds 5] [--wall] [--json FILE]
        [--name LABEL] COMMAND [--name LABEL] COMMAND ...
e.g.
    DATA=/usr/share/datasets/fashion-mnist
    python benchmarks/alternate.py --rounds 5 \\
        --name numpy "python -m lab --dataset fashion --data-dir $DATA --benchmark" \\
        --name torch "/work/torchenv/bin/python benchmarks/torch_vae.py $DATA --epochs 3"
Give a --name to every command or to none (they are then called cmd1, cmd2, ...). Progress goes to
stderr; the Markdown table of seconds and ratios (first command / each other one) and a summary
line per command to stdout. Standard library only.
"""
import argparse
import json
import re
import statistics
import subprocess
import sys
import time

MEDIAN_EPOCH = re.compile(r"median epoch ([0-9.]+) s")
NO_TIME = ("printed no time (no JSON line with epoch_s_median, no 'median epoch N s'; "
           "--wall times the whole run)")


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
    if not found:
        return None
    return float(found[-1])


def run_once(name, command, wall):
    """Run a shell command to completion; its seconds (printed, or wall-clock with wall) and its
    wall-clock seconds. Raises CommandError."""
    t0 = time.perf_counter()
    done = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True)
    wall_seconds = time.perf_counter() - t0
    if wall:
        seconds = wall_seconds
    else:
        seconds = seconds_from(done.stdout)
    if done.returncode != 0 or seconds is None:
        if done.returncode != 0:
            what = f"exited with code {done.returncode}"
        else:
            what = NO_TIME
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        indented_tail = "".join(f"\n    {line}" for line in tail)
        raise CommandError(f"{name} ({command}) {what}{indented_tail}")
    return seconds, wall_seconds


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def per_round_ratios(numerator, denominator):
    """numerator[r] / denominator[r] for every round r: two commands' seconds in the same round."""
    return [a / b for a, b in zip(numerator, denominator)]


def print_table(seconds, ratios, rounds, unit):
    """The Markdown table: a row per round, a column per command and per ratio."""
    names = list(seconds)
    header = [f"{n} {unit}" for n in names] + list(ratios)
    print("| round | " + " | ".join(header) + " |")
    print("|---" * (1 + len(header)) + "|")
    for r in range(rounds):
        cells = [f"{seconds[n][r]:.3f}" for n in names]
        cells += [f"{ratio[r]:.3f}" for ratio in ratios.values()]
        print(f"| {r + 1} | " + " | ".join(cells) + " |")


def print_summaries(seconds, ratios, rounds, unit):
    """A line per command: its median and range of seconds, and its ratio to the first command."""
    first = next(iter(seconds))
    plural = "s" if rounds != 1 else ""
    for n, values in seconds.items():
        t = summary(values)
        line = (f"{n}: median {t['median']:.3f} {unit} [{t['min']:.3f}, {t['max']:.3f}] "
                f"over {rounds} round{plural}")
        if n != first:
            q = summary(ratios[f"{first} / {n}"])
            line += f"; {first} / {n}: median {q['median']:.3f} [{q['min']:.3f}, {q['max']:.3f}]"
        print(line)


def main():
    p = argparse.ArgumentParser(
        description="Run commands alternately and compare their epoch times.")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--wall", action="store_true",
                   help="time each command by its wall clock, not what it prints")
    p.add_argument("--json", metavar="FILE", help="also write the raw numbers here")
    p.add_argument("--name", action="append", default=[], metavar="LABEL",
                   help="a label for the command after it")
    p.add_argument("commands", nargs="+", metavar="COMMAND", help="a shell command, quoted")
    args = p.parse_intermixed_args()
    if len(args.commands) < 2:
        p.error("give two or more commands to compare")
    if args.name and len(args.name) != len(args.commands):
        p.error(f"{len(args.name)} --name labels for {len(args.commands)} commands: "
                f"give one to each or to none")
    if len(set(args.name)) != len(args.name):
        p.error("two commands have the same --name: give each its own")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    # {label: shell command}, in the order given; the labels pair with the commands one to one
    if args.name:
        commands = dict(zip(args.name, args.commands))
    else:
        commands = {f"cmd{i + 1}": command for i, command in enumerate(args.commands)}

    seconds = {name: [] for name in commands}
    try:
        for r in range(1, args.rounds + 1):
            for name, command in commands.items():
                s, wall_seconds = run_once(name, command, args.wall)
                seconds[name].append(s)
                print(f"round {r}/{args.rounds}  {name}: {s:.3f} s  (run {wall_seconds:.1f} s)",
                      file=sys.stderr, flush=True)
    except CommandError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)

    first, *others = commands
    # ratio > 1: the first command is slower than that one, by that factor, in the same round
    ratios = {f"{first} / {o}": per_round_ratios(seconds[first], seconds[o]) for o in others}
    unit = "wall s" if args.wall else "s"
    print_table(seconds, ratios, args.rounds, unit)
    print()
    print_summaries(seconds, ratios, args.rounds, unit)

    if args.json:
        raw_commands = [{"name": n, "command": c, "seconds": seconds[n], **summary(seconds[n])}
                        for n, c in commands.items()]
        raw_ratios = {k: {"per_round": v, **summary(v)} for k, v in ratios.items()}
        raw = {"rounds": args.rounds, "wall": args.wall,
               "commands": raw_commands, "ratios": raw_ratios}
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
