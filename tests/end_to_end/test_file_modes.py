"""A run's files have the mode the umask gives (issue 28: the temporary file + rename made every file 0600, so on
a shared cluster nobody else could read the report or the predictions)."""

import os
import stat


def test_every_file_and_folder_of_a_run_has_the_umasks_mode(small_run):
    mask = os.umask(0o022)
    os.umask(mask)  # the test process's umask, which the run's subprocess inherited
    wrong = []
    for path in [small_run, *small_run.rglob("*")]:
        if "uploads" in path.relative_to(small_run).parts[:2]:
            continue  # the app's browser uploads: Gradio keeps them private (0600) and deletes them on a schedule
        status = path.lstat()
        if stat.S_ISLNK(status.st_mode):
            continue
        expected = (0o777 if stat.S_ISDIR(status.st_mode) else 0o666) & ~mask
        if stat.S_IMODE(status.st_mode) != expected:  # as `ls -l` shows it: -rw-r--r-- under umask 022
            wrong.append(f"{stat.filemode(status.st_mode)} {path.relative_to(small_run)}")
    assert not wrong, f"umask {oct(mask)}: " + "; ".join(wrong[:20])
