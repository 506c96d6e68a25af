"""The scheduler's tracepoints as `perf script -F comm,pid,tid,cpu,time,event,trace` prints
them, read into events: what benches/latency-trace and benches/sched-idle replay to know, at
each moment, which thread runs and which wait on each core."""

import re
from typing import NamedTuple, Optional, Union

# An exiting thread's last switch shows its pid and tid as -1.
_HEAD = re.compile(r'^\s*(.*?)\s+(-?\d+)/(-?\d+)\s+\[(\d+)\]\s+([\d.]+):\s+sched:(\w+):\s*(.*)$')
_SWITCH = re.compile(r'prev_comm=(.*?) prev_pid=(\d+) prev_prio=\d+ prev_state=(\S+) ==> '
                     r'next_comm=(.*?) next_pid=(\d+)')
_WAKING = re.compile(r'comm=(.*?) pid=(\d+) prio=\d+ target_cpu=(\d+)')
_MIGRATE = re.compile(r'comm=(.*?) pid=(\d+) prio=\d+ orig_cpu=(\d+) dest_cpu=(\d+)')


class Switch(NamedTuple):
    """`prev` leaves the core in `state` (R: still runnable), `next` takes it; 0 is idle."""
    prev_comm: str
    prev: int
    state: str
    next_comm: str
    next: int


class Waking(NamedTuple):
    """`tid` is woken, to run on core `target`."""
    comm: str
    tid: int
    target: int


class Migrate(NamedTuple):
    """`tid` moves from core `orig` to core `dest`."""
    comm: str
    tid: int
    orig: int
    dest: int


class Event(NamedTuple):
    """One scheduler event, on `core` at `time` (s), in the thread `tid` of process `pid`."""
    comm: str
    pid: int
    tid: int
    core: int
    time: float
    what: Optional[Union[Switch, Waking, Migrate]]


def read(lines):
    """The scheduler events among `lines`, in order; `what` is None for other sched events."""
    for line in lines:
        m = _HEAD.match(line)
        if not m:
            continue
        comm, pid, tid, core, time, name, rest = m.groups()
        what = None
        if name == "sched_switch":
            s = _SWITCH.search(rest)
            what = Switch(s[1], int(s[2]), s[3], s[4], int(s[5]))
        elif name == "sched_waking":
            s = _WAKING.search(rest)
            what = Waking(s[1], int(s[2]), int(s[3]))
        elif name == "sched_migrate_task":
            s = _MIGRATE.search(rest)
            what = Migrate(s[1], int(s[2]), int(s[3]), int(s[4]))
        yield Event(comm, int(pid), int(tid), int(core), float(time), what)
