import threading
import time

import pytest

from falconspec.machine_load import OtherProcessesLoad, busy_cpu_seconds, own_cpu_seconds, shared


def test_other_processes_are_the_machines_busy_time_less_our_own():
    clock, busy, own = [0.0], [100.0], [5.0]
    load = OtherProcessesLoad(interval=10, busy=lambda: busy[0], own=lambda: own[0], clock=lambda: clock[0])
    load._last = load._read()
    for seconds, machine, ours in [(10, 20.0, 19.0), (10, 12.0, 2.0), (5, 1.0, 1.0)]:
        clock[0] += seconds
        busy[0] += machine
        own[0] += ours
        load.sample()
    # others: 1, 10 and 0 CPU seconds over 25 s; the busiest interval kept 1.0 core busy
    assert load.summary() == {"mean_cores": 0.44, "max_cores": 1.0, "interval_s": 10, "samples": 3}
    assert shared(load.summary(), cores=2)  # a whole core of two for one interval
    assert not shared({"mean_cores": 0.3, "max_cores": 0.9}, cores=2)


def test_nothing_is_measured_without_proc_stat(tmp_path):
    assert busy_cpu_seconds(tmp_path / "missing") is None
    with OtherProcessesLoad(interval=0.01, busy=lambda: None) as load:
        time.sleep(0.05)
    assert load.summary() is None
    with pytest.raises(ValueError, match="interval"):
        OtherProcessesLoad(interval=0)


@pytest.mark.skipif(busy_cpu_seconds() is None, reason="needs Linux /proc/stat")
def test_the_machines_busy_time_includes_our_own_threads():
    """What the subtraction relies on: CPU time this process spends (here a spinning thread) shows in the
    machine's busy time, so it is not counted as other processes'."""
    busy, own = busy_cpu_seconds(), own_cpu_seconds()
    stop = time.time() + 1.0
    thread = threading.Thread(target=lambda: [None for _ in iter(lambda: time.time() < stop, False)])
    thread.start()
    thread.join()
    spent = own_cpu_seconds() - own
    assert spent > 0.3
    assert busy_cpu_seconds() - busy >= 0.8 * spent
