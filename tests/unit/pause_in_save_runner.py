"""``python tests/unit/pause_in_save_runner.py STEP ARGS...``: the trainer (``python -m
terrabyte.pretrain ARGS``) with the save of step STEP stopped after every file is written and
fsynced, before the folder is renamed into place; a marker file ``.paused-in-save-stepSTEP`` in the
checkpoints folder (holding the pid) says it got there. test_kill_resume.py SIGKILLs it then.

The pause is patched in here, in the test's process: production code carries no hook for it."""
import os
import runpy
import sys
import time


def main() -> None:
    from terrabyte.pretrain.checkpoint import store as checkpoint

    step, args = int(sys.argv[1]), sys.argv[2:]
    publish = checkpoint.publish

    def paused_publish(root, tmp, tag):
        if tag == f"step{step}":
            (root / f".paused-in-save-step{step}").write_text(str(os.getpid()))
            time.sleep(3600)
        publish(root, tmp, tag)

    checkpoint.publish = paused_publish
    sys.argv = ["terrabyte.pretrain", *args]
    runpy.run_module("terrabyte.pretrain", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
