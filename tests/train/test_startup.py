"""Start-up helpers: the garbage collector paused for start-up only, and the process's age."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_pause_then_resume_turns_collection_back_on_with_start_up_objects_frozen() -> None:
    out = run_python("""
        import gc
        from mamba_training.train import startup
        startup.pause_gc()
        paused = gc.isenabled()
        startup.resume_gc()
        print(paused, gc.isenabled(), gc.get_freeze_count() > 0)
    """)
    assert out == "False True True"


def test_resume_leaves_a_collector_it_did_not_pause_alone() -> None:
    out = run_python("""
        import gc
        from mamba_training.train import startup
        gc.disable()              # the embedding program's choice
        startup.pause_gc()        # already off: not ours to turn back on
        startup.resume_gc()
        print(gc.isenabled(), gc.get_freeze_count())
    """)
    assert out == "False 0"


def test_process_age_counts_from_the_process_start() -> None:
    out = run_python("""
        import time
        from mamba_training.train.startup import process_age
        first = process_age()
        time.sleep(1.0)
        print(first, process_age())
    """)
    first, later = (float(x) for x in out.split())
    assert 0.0 <= first < 20.0
    assert 0.8 <= later - first <= 5.0


def test_a_train_command_that_fails_before_its_first_step_turns_collection_back_on(tmp_path) -> None:
    out = run_python(f"""
        import gc
        from mamba_training.cli.main import main
        try:
            main(["train", "--set", "checkpoint.store={tmp_path / 'run'}", "--set", "data.corpus={tmp_path / 'none.txt'}"])
        except SystemExit as exit:
            print(exit.code, gc.isenabled())
    """)
    assert out.splitlines()[-1] == "2 True", out  # the missing corpus is a usage error
