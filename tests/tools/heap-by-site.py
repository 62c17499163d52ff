#!/usr/bin/env python3
"""Live heap by allocation site, per terminal, from a heaptrack recording (docs/benchmarks.md,
"Memory per idle terminal").

Record the broker under heaptrack with the fleet connected and idle, then SIGKILL it: what was
never freed is what was live at the kill. Then:

    heaptrack_print -f heap.zst --print-leaks 0 --print-peaks 0 --print-allocators 0 \
        --print-temporary 0 --print-histogram 0 --print-massif 0 \
        --print-flamegraph folded.txt --flamegraph-cost-type leaked
    tests/tools/heap-by-site.py folded.txt --terminals 10000 [--depth 3] [--top 40] [--filter S]

Each stack is named by its innermost DEPTH frames outside allocator, collection and runtime
plumbing (file:function, innermost first). heaptrack sees only malloc: the broker's binaries
install jemalloc (`#[global_allocator]` in tests/src/bin/pf-broker.rs and broker/src/main.rs),
so record a build with that item removed.
"""
import argparse
import collections
import re

PLUMBING = (
    'alloc.rs', 'raw_vec', 'boxed.rs', 'rc.rs', 'sync.rs', 'arc.rs', 'unix.rs', 'panic',
    'unwind_safe.rs', 'panicking.rs', 'core.rs', 'harness.rs', 'raw.rs', 'unsafe_cell.rs',
    'mod.rs', 'vec.rs', 'spec_from', 'into_iter', 'clone.rs', 'string.rs', 'slice.rs',
    'cell.rs', 'local.rs', 'context.rs', 'coop', 'scoped.rs', 'worker.rs', 'runtime.rs',
    'task_tracker.rs',
)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('folded')
    parser.add_argument('--terminals', type=int, default=10000)
    parser.add_argument('--depth', type=int, default=3)
    parser.add_argument('--top', type=int, default=40)
    parser.add_argument('--filter', default='')
    args = parser.parse_args()
    sites = collections.Counter()
    total = 0
    with open(args.folded) as folded:
        for line in folded:
            stack, _, cost = line.rstrip('\n').rpartition(' ')
            if not cost.isdigit():
                continue
            cost = int(cost)
            total += cost
            names = []
            for frame in reversed(stack.split(';')):
                located = re.search(r'\(([^)]*)\)\s*$', frame)
                if not located or located.group(1).startswith(PLUMBING):
                    continue
                name = frame[:frame.rfind('(')].strip()
                names.append(located.group(1) + ':' + name[-45:])
                if len(names) >= args.depth:
                    break
            site = ' <- '.join(names)
            if args.filter in site:
                sites[site] += cost
    print(f'live heap {total / 1e6:.2f} MB')
    for site, cost in sites.most_common(args.top):
        print(f'{cost / 1e6:8.2f} MB {cost / args.terminals:7.0f} B/terminal  {site}')


if __name__ == '__main__':
    main()
