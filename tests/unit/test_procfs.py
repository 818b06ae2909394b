"""mpirl.procfs: the /proc readers that peers (is a rank alive?), rundir (which process holds the
lock?) and the torch backend (are Gloo's threads asleep?) share."""

import os

from mpirl import procfs


def test_stat_fields_start_after_a_comm_with_spaces_and_parentheses(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("4242 (a (b) c) S 1 " + " ".join(str(i) for i in range(30)) + "\n")
    fields = procfs.stat_fields(str(stat))
    assert fields[0] == "S" and fields[1] == "1" and fields[19] == "17"


def test_unreadable_files_read_as_empty(tmp_path):
    assert procfs.read(str(tmp_path / "gone")) == ""
    assert procfs.stat_fields(str(tmp_path / "gone")) == []
    (tmp_path / "no-comm").write_text("garbage without the closing parenthesis")
    assert procfs.stat_fields(str(tmp_path / "no-comm")) == []


def test_this_process_reads_as_running_with_its_start_time():
    if not os.path.exists("/proc/self/stat"):
        return  # off Linux the readers are empty, which the test above covers
    fields = procfs.stat_fields(f"/proc/{os.getpid()}/stat")
    assert fields[0] in ("R", "S") and int(fields[19]) > 0
