"""`torchrun` (torch.distributed.run) as this machine's training jobs start it, minus CPython's last
garbage collection when the launcher exits.

The launcher has imported torch and its elastic agent; at exit the interpreter walks every object
they allocated only to free memory the OS takes back anyway (~0.35 s per job: six jobs in `make
run`). `gc.freeze()` moves them to the permanent generation, which that collection skips
(docs.python.org/3/library/gc.html#gc.freeze). Arguments, output, restarts and the exit status are
torchrun's own: this module only runs it.
"""
import atexit
import gc
import runpy

if __name__ == "__main__":
    atexit.register(gc.freeze)
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
