"""``avkv.cli.exit_now``: the command-line processes end without the interpreter's module teardown, but only after
their output is flushed and their ``atexit`` handlers have run, and never while a non-daemon thread works."""
import subprocess
import sys

from tests.conftest import ROOT


def _py(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_flushes_output_runs_atexit_and_keeps_the_status():
    p = _py("import atexit, logging, sys\n"
            "from avkv.cli import exit_now\n"
            "atexit.register(lambda: print('atexit ran', flush=False))\n"
            "logging.basicConfig(stream=sys.stderr); logging.getLogger('x').warning('logged')\n"
            "print('buffered', end='')\n"
            "exit_now(3)\n"
            "print('never')")
    assert p.returncode == 3
    assert p.stdout.startswith("buffered") and "atexit ran" in p.stdout and "never" not in p.stdout
    assert "logged" in p.stderr


def test_waits_for_a_running_non_daemon_thread():
    p = _py("import threading, time\n"
            "from avkv.cli import exit_now\n"
            "def work():\n"
            "    time.sleep(0.5); print('thread finished', flush=True)\n"
            "threading.Thread(target=work).start()\n"
            "exit_now(0)")
    assert p.returncode == 0 and "thread finished" in p.stdout


def test_none_is_success():
    assert _py("from avkv.cli import exit_now; exit_now(None)").returncode == 0
