"""Every op's process exits without the interpreter's last garbage collection, and nothing else
about its exit changes: atexit handlers run, output is flushed, a failure keeps its exit status."""
import ast
import inspect
import subprocess
import sys
import textwrap

import pytest

from components import ops


@pytest.mark.parametrize("name", sorted(ops()))
def test_every_op_skips_the_final_gc_before_anything_else(name):
    body = ast.parse(textwrap.dedent(inspect.getsource(ops()[name]))).body[0].body
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), "a docstring first"
    calls = [ast.unparse(statement) for statement in body[1:3]]
    assert calls == ["from components.factory import skip_final_gc", "skip_final_gc()"], \
        f"{name}: registered first, it runs after the atexit handlers its imports register"


@pytest.mark.parametrize("code, status", [("pass", 0), ("raise SystemExit(3)", 3), ("1/0", 1)])
def test_the_exit_keeps_handlers_output_and_status_and_freezes_the_heap(code, status):
    program = textwrap.dedent(f"""
        import atexit, gc, sys
        # registered before skip_final_gc, so it runs after it: the heap is frozen by then
        atexit.register(lambda: print("frozen", gc.get_freeze_count() > 0, flush=True))
        from components.factory import skip_final_gc
        skip_final_gc()
        atexit.register(lambda: print("a library's handler ran"))
        sys.stdout.write("buffered output ")
        {code}
    """)
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == status, done.stderr
    assert done.stdout == "buffered output a library's handler ran\nfrozen True\n"
    assert ("ZeroDivisionError" in done.stderr) == (status == 1)
